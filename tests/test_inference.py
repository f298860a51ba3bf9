"""The one inference path: whole images, the sliding window streamed in bands, TTA, on both runners."""
import itertools

import numpy as np
import pytest
import torch
from conftest import make_dataset  # noqa: F401  (puts the repo on sys.path)
from torch import nn

from checkpoint import ModelMeta
from errors import UserError
from inference import OnnxRunner, Predictor, TorchRunner
from labels import ChannelStats, Labels
from raster import tile_starts


class Constant(nn.Module):
    """Logit 2.5 everywhere, whatever the input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[-2:]), 2.5) + self.w


class Shift(nn.Module):
    """Not flip-equivariant: output = input shifted right by one pixel."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.pad(x[..., :-1], (1, 0)) + self.w


class PixelLinear(nn.Module):
    """A 1x1 convolution: equivariant to every flip and rotation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x.float())


class NumpyRunner(OnnxRunner):
    """The ONNX runner's numpy operations around a torch model, so both runners can be compared without an export."""

    def __init__(self, model):
        self.model, self.device = model, "cpu"

    def forward(self, x):
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def meta(classes: int = 1, resize: bool = False) -> ModelMeta:
    labels = Labels([255]) if classes == 1 else Labels(list(range(1, classes)))
    return ModelMeta("unet", "resnet18", 3, classes, labels, [], ChannelStats([0.0] * 3, [1.0] * 3, [0.0] * 3,
                                                                             [1.0] * 3, [1] * 2), "float32", 32,
                     resize, 64)


def predictor(model, tile=64, runner=TorchRunner, classes=1, **kw) -> Predictor:
    r = runner(model, "cpu") if runner is TorchRunner else runner(model)
    return Predictor.create(meta(classes), r, tile_size=tile, **kw)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(300, 64, 32)[-1] == 236 and tile_starts(300, 64, 32)[0] == 0
    assert tile_starts(50, 64, 32) == [0]
    starts = tile_starts(457, 64, 32)
    assert all(b - a <= 64 for a, b in itertools.pairwise(starts))
    assert tile_starts(300, 64, 64, edge="pad") == [0, 64, 128, 192, 256]


def test_sliding_window_keeps_any_size_and_blends_without_seams():
    out = predictor(Constant(), batch_size=5).logits(torch.randn(1, 3, 300, 457))
    assert out.shape == (1, 1, 300, 457)
    assert torch.allclose(out, torch.full_like(out, 2.5))


def test_whole_image_path_pads_and_crops_back():
    model = PixelLinear()
    x = torch.randn(2, 3, 45, 70)
    out = predictor(model, tile=128, classes=2).logits(x)
    assert out.shape == (2, 2, 45, 70)
    assert torch.allclose(out, model(x), atol=1e-5)


@pytest.mark.parametrize("shape", [(200, 130), (40, 300), (64, 64), (65, 64)])
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(shape):
    model = PixelLinear()
    x = torch.randn(1, 3, *shape)
    assert torch.allclose(predictor(model, classes=2, overlap=0.25).logits(x), model(x), atol=1e-5)


def test_bands_stream_the_rows_in_order_in_bounded_memory():
    model = PixelLinear()
    image = torch.randn(3, 250, 100)
    for batch, rows in ((1, 32), (3, 32), (8, 96)):  # 3 tiles per row of tiles, 32 rows apart
        p = predictor(model, classes=2, overlap=0.5, batch_size=batch)
        bands = list(p.bands(lambda y, x, h, w: image[:, y:y + h, x:x + w], 250, 100))
        assert bands[0][0] == 0 and bands[-1][1] == 250
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))
        assert max(b[1] - b[0] for b in bands[:-1]) <= rows  # the last band holds the last tile's own rows
        assert torch.allclose(torch.cat([b[2] for b in bands], 1), model(image[None])[0], atol=1e-5)


def test_tta_keeps_results_of_an_equivariant_model_and_changes_others():
    x = torch.randn(2, 3, 32, 32)
    model = PixelLinear()
    for mode in ("flip", "d4"):
        assert torch.allclose(predictor(model, classes=2, tta=mode).forward_tta(x), model(x), atol=1e-5)
    assert not torch.allclose(predictor(Shift(), classes=2, tta="flip").forward_tta(x), Shift()(x))


@pytest.mark.parametrize("tta", ["none", "d4"])
def test_numpy_runner_matches_torch_runner(tta):
    """The ONNX path shares the algorithm: its numpy operations must give the torch path's results."""
    torch.manual_seed(0)
    model = Shift()
    image = np.random.default_rng(0).random((150, 170, 3), dtype=np.float32)
    a = predictor(model, tta=tta).predict(image)
    b = predictor(model, runner=NumpyRunner, tta=tta).predict(image)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert a.mask.dtype == np.uint8 and set(np.unique(a.mask)) <= {0, 255} and a.mask.shape == (150, 170)


def test_resize_models_stretch_and_come_back():
    p = Predictor.create(meta(resize=True), TorchRunner(Constant(), "cpu"), tile_size=64)
    q = Predictor.create(meta(resize=True), NumpyRunner(Constant()), tile_size=64)
    image = np.zeros((50, 90, 3), np.float32)
    assert p.predict(image).probs.shape == q.predict(image).probs.shape == (1, 50, 90)


def test_settings_are_checked():
    for bad in ({"tile_size": 48}, {"overlap": 1.0}, {"tta": "x"}, {"batch_size": 0}, {"threshold": 1.0}):
        with pytest.raises(UserError):
            Predictor.create(meta(), TorchRunner(Constant(), "cpu"), **{"tile_size": 64, **bad})


def test_input_problems_name_the_file():
    p = predictor(Constant())
    assert p.input_problem("a.tif", 4, "float32") == ("a.tif: 4 channel(s), but the model was trained on 3; give "
                                                      "images with the training layout (an alpha channel? save them "
                                                      "as RGB)")
    assert p.input_problem("a.tif", 1, "float32").endswith("(grey for colour: the model needs colour images)")
    assert p.input_problem("a.tif", 2, "float32").endswith("with the training layout")
    assert p.input_problem("a.tif", 3, "float32") is None
    assert "uint16" in p.input_problem("a.tif", 3, "uint16", 0, 5000)  # far outside the training range 0..1
    assert p.input_problem("a.tif", 3, "float64", 0.0, 1.0) is None  # another type, same range: a warning
