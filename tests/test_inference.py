import itertools

import torch
from conftest import make_dataset  # noqa: F401  (puts the repo on sys.path)
from torch import nn

from inference import forward_tta, predict, tile_starts


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
        return self.conv(x)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(300, 64, 32)[-1] == 236 and tile_starts(300, 64, 32)[0] == 0
    assert tile_starts(50, 64, 32) == [0]
    starts = tile_starts(457, 64, 32)
    assert all(b - a <= 64 for a, b in itertools.pairwise(starts))


def test_sliding_window_keeps_any_size_and_blends_without_seams():
    out = predict(Constant(), torch.randn(1, 3, 300, 457), tile_size=64, overlap=0.5, batch_size=5)
    assert out.shape == (1, 1, 300, 457)
    assert torch.allclose(out, torch.full_like(out, 2.5))


def test_whole_image_path_pads_and_crops_back():
    model = PixelLinear()
    x = torch.randn(2, 3, 45, 70)
    out = predict(model, x, tile_size=128)
    assert out.shape == (2, 2, 45, 70)
    assert torch.allclose(out, model(x), atol=1e-5)


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    model = PixelLinear()
    x = torch.randn(1, 3, 200, 130)
    assert torch.allclose(predict(model, x, tile_size=64, overlap=0.25), model(x), atol=1e-5)


def test_tta_keeps_results_of_an_equivariant_model_and_changes_others():
    x = torch.randn(2, 3, 32, 32)
    model = PixelLinear()
    for mode in ("flip", "d4"):
        assert torch.allclose(forward_tta(model, x, mode), model(x), atol=1e-5)
    assert not torch.allclose(forward_tta(Shift(), x, "flip"), Shift()(x))
