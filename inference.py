"""One inference path, from a trained model to probabilities and masks, for training's validation, validate.py,
predict.py, export.py and serve.py alike.

    predictor = Predictor.load("logs/exp", device="cuda")          # a checkpoint, experiment or exported bundle
    result = predictor.predict(image)                                # (H, W, C) as read from disk -> Prediction

A Predictor holds the model's metadata and a runner: TorchRunner (a checkpoint, PyTorch on any device) or
OnnxRunner (an exported bundle, onnxruntime without torch). The algorithm is written once over the runner's few
array operations: images up to the tile size go whole (padded to a multiple of 32), in batches; larger ones slide
a tile with Gaussian-weighted blending of logits, streamed in bands of rows so a raster of any size is predicted in
bounded memory; flips or the 8 D4 transforms as test-time augmentation; --resize models stretch to their training
size and back. Inputs are raw pixel values (N, C, H, W): the model normalises them itself.
"""
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoint import ModelMeta
from cli import at_least, fraction, multiple_of_32, probability
from errors import UserError, warn
from raster import tile_starts

TTA_MODES = ("none", "flip", "d4")
CPU_TILE, CPU_PIXELS = 384, 2 ** 18  # files and scenes on the CPU: largest tile, pixels per forward pass


def add_prediction_flags(group, tile_default: str, batch_default: int | None, batch_help: str) -> None:
    """A Predictor's settings as flags, defined once for every script that predicts: -t, --tile-size, --overlap,
    --tta, -b (argparse dests threshold, tile_size, overlap, tta, batch_size)."""
    group.add_argument("-t", "--threshold", type=probability, default=None,
                       help="binary threshold on the foreground probability (default: the model's, else 0.5)")
    group.add_argument("--tile-size", type=multiple_of_32("--tile-size"), default=None,
                       help="images up to this size go whole, larger ones in overlapping tiles "
                            f"(default: {tile_default})")
    group.add_argument("--overlap", type=fraction, default=0.5, help="overlap between tiles, a fraction (0.5)")
    group.add_argument("--tta", default="none", choices=TTA_MODES,
                       help="test-time augmentation: flips, or all 8 D4 ops")
    group.add_argument("-b", "--batch-size", type=at_least(1), default=batch_default,
                       help=f"images or tiles per forward pass ({batch_help})")


def tta_ops(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs of the TTA group."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True)]
    return [(k, f) for k in range(4) for f in (False, True)]


def gaussian_window(height: int, width: int) -> np.ndarray:
    """Weights peaking at the tile centre (sigma = side / 8), floored so edge pixels still count a little."""
    def g(n: int) -> np.ndarray:
        r = np.arange(n, dtype=np.float32) - (n - 1) / 2
        return np.exp(-(r ** 2) / (2 * (n / 8) ** 2))

    w = g(height)[:, None] * g(width)[None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- runners
class TorchRunner:
    """A model in PyTorch on a device, under autocast when amp is a dtype; arrays are torch tensors there."""

    def __init__(self, model, device, amp=None, channels_last: bool = False):
        import torch
        import torch.nn.functional as F

        from runtime import cap_threads

        cap_threads()
        self.torch, self.F = torch, F
        self.model, self.device, self.amp = model, torch.device(device), amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        self.windows: dict = {}

    def asarray(self, images):
        """(N, H, W, C) numpy or tensor -> (N, C, H, W) on the device: with channels last, a view, not a copy."""
        if isinstance(images, np.ndarray) and images.dtype not in (np.uint8, np.float32):
            images = images.astype(np.float32)  # e.g. uint16, which few torch kernels take
        x = self.torch.as_tensor(images).to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)

    def numpy(self, x) -> np.ndarray:
        return x.float().cpu().numpy()

    def forward(self, x):
        with self.torch.no_grad():
            if self.amp is None:
                return self.model(x.contiguous(memory_format=self.memory_format)).float()
            with self.torch.autocast(self.device.type, dtype=self.amp):
                return self.model(x.contiguous(memory_format=self.memory_format)).float()

    def flip(self, x):
        return x.flip(-1)

    def rot90(self, x, k: int):
        return self.torch.rot90(x, k, (-2, -1))

    def pad(self, x, height: int, width: int):
        ph, pw = height - x.shape[-2], width - x.shape[-1]
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
        return self.F.pad(x.float(), (0, pw, 0, ph), mode=mode)

    def resize(self, x, height: int, width: int):
        return self.F.interpolate(x.float(), (height, width), mode="bilinear", align_corners=False)

    def zeros(self, shape: tuple):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def window(self, height: int, width: int):
        if (height, width) not in self.windows:
            self.windows[height, width] = self.torch.from_numpy(gaussian_window(height, width)).to(self.device)
        return self.windows[height, width]

    def cat(self, parts: list, dim: int):
        return self.torch.cat(parts, dim)

    def stack(self, parts: list):
        return self.torch.stack(parts)

    def activate(self, logits, binary: bool):
        return self.torch.sigmoid(logits) if binary else self.torch.softmax(logits, 1)


class OnnxRunner:
    """An exported model.onnx in onnxruntime; arrays are numpy."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed: pip install -r requirements-infer.txt") from None
        from runtime import quota_threads

        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warnings about unused initialisers are not the user's concern
        options.intra_op_num_threads = quota_threads() or 0  # 0: one per core, its default
        providers = providers or ort.get_available_providers()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own types for broken files
            raise UserError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]}); export the "
                            "model again with export.py") from None
        self.input = self.session.get_inputs()[0].name
        self.device = "cpu"  # where its arrays live: numpy, on the host, whichever provider runs the graph

    def asarray(self, images) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))

    def numpy(self, x) -> np.ndarray:
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float32)

    def flip(self, x):
        return x[..., ::-1]

    def rot90(self, x, k: int):
        return np.rot90(x, k, axes=(-2, -1))

    def pad(self, x, height: int, width: int):
        ph, pw = height - x.shape[-2], width - x.shape[-1]
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "edge"
        return np.pad(x.astype(np.float32), [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)], mode=mode)

    def resize(self, x, height: int, width: int):
        import cv2

        n, c = x.shape[:2]
        out = np.empty((n, c, height, width), np.float32)
        for i in range(n):  # cv2 takes channels last; bilinear with half-pixel centres like torch
            out[i] = cv2.resize(x[i].transpose(1, 2, 0).astype(np.float32), (width, height),
                                interpolation=cv2.INTER_LINEAR).reshape(height, width, c).transpose(2, 0, 1)
        return out

    def zeros(self, shape: tuple):
        return np.zeros(shape, np.float32)

    def window(self, height: int, width: int):
        return gaussian_window(height, width)

    def cat(self, parts: list, dim: int):
        return np.concatenate(parts, dim)

    def stack(self, parts: list):
        return np.stack(parts)

    def activate(self, logits, binary: bool):
        if binary:
            return 1 / (1 + np.exp(-logits))
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def on_gpu(runner) -> bool:
    """The model runs on a GPU: PyTorch on a CUDA device, or onnxruntime with its CUDA provider."""
    session = getattr(runner, "session", None)
    return str(runner.device).startswith("cuda") or (session is not None
                                                     and "CUDAExecutionProvider" in session.get_providers())


# -------------------------------------------------------------------------------------------------- predictor
@dataclass
class Prediction:
    """One image's result at its own size."""
    probs: np.ndarray  # (K, H, W) float32: the foreground probability (binary, K = 1) or one per class
    classes: np.ndarray  # (H, W) uint8 class indices (0 = background)
    mask: np.ndarray  # (H, W) the classes in the dataset's own label values (0/255, or the class values)


@dataclass
class Predictor:
    meta: ModelMeta
    runner: TorchRunner | OnnxRunner
    tile_size: int
    overlap: float = 0.5
    tta: str = "none"
    batch_size: int = 8
    threshold: float = 0.5
    min_size: int = 32  # the architecture's smallest input side
    fixed_size: int | None = None  # a model exported for one input size only: every input is padded or tiled to it

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def load(cls, path: Path, device: str | None = None, amp: str = "auto", **settings) -> "Predictor":
        """From a best.pth / last.pth, an experiment folder (its best.pth), or an exported bundle (its folder,
        model.onnx or segkit.json). settings: those of create()."""
        from bundle import bundle_folder

        path = Path(path)
        if not path.exists():
            raise UserError(f"-m {path}: not found; give a best.pth, an experiment folder or an exported bundle")
        folder = bundle_folder(path)
        if folder is not None:
            return cls.from_bundle(folder, **settings)
        import checkpoint

        return cls.from_checkpoint(checkpoint.find(path, "-m"), device, amp, **settings)

    @classmethod
    def from_checkpoint(cls, path: Path, device: str | None = None, amp: str = "auto", **settings) -> "Predictor":
        import checkpoint
        from runtime import amp_dtype, channels_last, compiler_not_loaded, select_device

        with compiler_not_loaded():
            from model import Segmenter, min_input_size, model_from_meta

        ckpt = checkpoint.load(path)
        dev = select_device(device=device)
        model = Segmenter(model_from_meta(ckpt.meta, ckpt.model), ckpt.meta.stats).to(dev).eval()
        runner = TorchRunner(model, dev, amp_dtype(amp, dev), channels_last(dev))
        return cls.create(ckpt.meta, runner, min_input_size(ckpt.meta.arch), **settings)

    @classmethod
    def from_bundle(cls, folder: Path, providers: list[str] | None = None, **settings) -> "Predictor":
        import bundle

        info, meta = bundle.read(folder)
        runner = OnnxRunner(Path(folder) / info["model"], providers)
        bundle.check_graph(folder, info, meta, runner.session.get_inputs(), runner.session.get_outputs())
        fixed = info.get("fixed_size")
        if fixed:  # the graph takes one size: tiles of it, whatever --tile-size says
            settings["tile_size"] = int(fixed)
        return cls.create(meta, runner, int(info.get("min_size", 32)), fixed_size=fixed, **settings)

    @classmethod
    def create(cls, meta: ModelMeta, runner, min_size: int = 32, tile_size: int | None = None,
               threshold: float | None = None, batch_size: int | None = None, for_scenes: bool = False,
               **settings) -> "Predictor":
        """A Predictor with the model's own defaults for what is not given (None). for_scenes: files of any size
        are coming, so on the CPU the tile is at most CPU_TILE and a forward pass about CPU_PIXELS pixels (memory
        grows about 0.7 KB per pixel of a pass there); on a GPU 16 tiles a pass."""
        settings = {k: v for k, v in settings.items() if v is not None}
        gpu = on_gpu(runner)
        if tile_size is None:
            tile_size = meta.val_tile_size
            if for_scenes and not gpu and not settings.get("fixed_size"):
                tile_size = min(tile_size, CPU_TILE)
        if batch_size is None:
            batch_size = (16 if gpu else max(1, CPU_PIXELS // tile_size ** 2)) if for_scenes else 8
        return cls(meta, runner, tile_size, threshold=meta.threshold if threshold is None else threshold,
                   min_size=min_size, batch_size=batch_size, **settings)

    def __post_init__(self):
        if self.tile_size % 32 or self.tile_size < self.min_size:
            raise UserError(f"--tile-size {self.tile_size} must be a multiple of 32 and at least {self.min_size}")
        if not 0 <= self.overlap < 1:
            raise UserError(f"--overlap {self.overlap} must be at least 0 and below 1")
        if self.tta not in TTA_MODES:
            raise UserError(f"--tta {self.tta}: choose one of {', '.join(TTA_MODES)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold {self.threshold} must be between 0 and 1")

    # --------------------------------------------------------------------------------------------- logits
    def logits(self, x):
        """(N, C, H, W) raw pixels as runner arrays -> (N, K, H, W) float32 logits at the same size."""
        r, (h, w) = self.runner, x.shape[-2:]
        if self.meta.resize:
            size = self.meta.image_size
            return r.resize(self.forward_tta(r.resize(x, size, size)), h, w)
        if self.whole(h, w):
            return self.forward_tta(r.pad(x, self._fit(h), self._fit(w)))[..., :h, :w]
        return r.stack([self.slide(image) for image in x])

    def whole(self, height: int, width: int) -> bool:
        """Such an image goes through the model whole (stretched, or up to the tile size), not tile by tile."""
        return self.meta.resize or (height <= self.tile_size and width <= self.tile_size)

    def images_per_pass(self, height: int, width: int) -> int:
        """How many such whole images one forward pass takes: the pixels of a batch of tiles, at most 256."""
        side = self.meta.image_size if self.meta.resize else None
        pixels = (side or self._fit(height)) * (side or self._fit(width))
        return max(1, min(256, self.batch_size * self.tile_size ** 2 // pixels))

    def tile_count(self, height: int, width: int) -> int:
        """The tiles bands() slides over such an image (1 where it goes whole)."""
        _, _, ys, xs = self.grid(height, width)
        return 1 if self.whole(height, width) else len(ys) * len(xs)

    def grid(self, height: int, width: int) -> tuple[int, int, list[int], list[int]]:
        """The sliding window over such an image: tile height and width, and the tiles' rows and columns."""
        th, tw = min(self.tile_size, self._fit(height)), min(self.tile_size, self._fit(width))
        return th, tw, tile_starts(height, th, max(1, int(th * (1 - self.overlap)))), \
            tile_starts(width, tw, max(1, int(tw * (1 - self.overlap))))

    def _fit(self, side: int) -> int:
        return self.fixed_size or max(self.min_size, math.ceil(side / 32) * 32)

    def forward_tta(self, x):
        """Mean of the model's logits over the TTA transforms, each undone on the output."""
        r, out = self.runner, None
        ops = tta_ops(self.tta)
        for k, flip in ops:
            t = r.flip(x) if flip else x
            y = r.forward(r.rot90(t, k) if k else t)
            y = r.rot90(y, -k) if k else y
            y = r.flip(y) if flip else y
            out = y if out is None else out + y
        return out / len(ops) if len(ops) > 1 else out

    def slide(self, image):
        """(C, H, W) -> (K, H, W) logits of an image larger than the tile, by bands of rows."""
        bands = self.bands(lambda y, x, h, w: image[:, y:y + h, x:x + w], *image.shape[-2:])
        return self.runner.cat([band for _, _, band in bands], 1)

    def bands(self, read: Callable[[int, int, int, int], object], height: int, width: int
              ) -> Iterator[tuple[int, int, object]]:
        """Slide the tile over a height x width image whose windows read(y, x, h, w) returns as (C, h, w) runner
        arrays; yield (y0, y1, logits of rows y0..y1 as (K, y1 - y0, width)) top to bottom, each band as soon as no
        later tile touches it. Tiles go in full batches across tile rows; memory: the rows one batch spans."""
        r = self.runner
        th, tw, ys, xs = self.grid(height, width)
        tiles = [(y, x) for y in ys for x in xs]
        weight, span = r.window(th, tw), max(width, tw)
        acc = norm = None  # the blended sums of image rows top .. top + acc rows
        top = 0
        for j in range(0, len(tiles), self.batch_size):
            batch = tiles[j:j + self.batch_size]
            inputs = r.stack([r.pad(read(y, x, min(th, height - y), min(tw, width - x)), th, tw) for y, x in batch])
            logits = self.forward_tta(inputs) * weight
            rows = batch[-1][0] + th - top
            if acc is None:
                acc, norm = r.zeros((logits.shape[1], rows, span)), r.zeros((rows, span))
            elif rows > norm.shape[0]:
                more = rows - norm.shape[0]
                acc = r.cat([acc, r.zeros((acc.shape[0], more, span))], 1)
                norm = r.cat([norm, r.zeros((more, span))], 0)
            for (y, x), t in zip(batch, logits, strict=True):
                acc[:, y - top:y - top + th, x:x + tw] += t
                norm[y - top:y - top + th, x:x + tw] += weight
            end = tiles[j + len(batch)][0] if j + len(batch) < len(tiles) else height  # no later tile reaches above
            if end > top:
                yield top, end, acc[:, :end - top, :width] / norm[:end - top, :width]
                acc, norm, top = acc[:, end - top:], norm[end - top:], end

    # ---------------------------------------------------------------------------------------------- results
    def probabilities(self, logits):
        return self.runner.activate(logits, self.meta.binary)

    def classes(self, probs):
        """(N, K, H, W) probabilities -> (N, H, W) class indices, the threshold deciding binary models."""
        return (probs[:, 0] > self.threshold) * 1 if self.meta.binary else probs.argmax(1)

    def predict(self, image: np.ndarray) -> Prediction:
        """One (H, W, C) image as read from disk (bands stacked) -> its Prediction."""
        probs = self.runner.numpy(self.probabilities(self.logits(self.runner.asarray(image[None]))))
        classes = self.classes(probs)[0].astype(np.uint8)
        return Prediction(probs[0], classes, self.meta.labels.label_values()[classes])

    # ---------------------------------------------------------------------------------------------- input
    def input_problem(self, name: str, channels: int, dtype: str, low: float | None = None,
                      high: float | None = None, types: str | None = None) -> str | None:
        """Why an image cannot go through this model (an error message), or None; warns where its pixel type
        differs from the training images' but its values lie in their range. types: the files' own pixel types
        ("uint8 image + uint16 nir"), which name the band that differs."""
        meta = self.meta
        if channels != meta.in_channels:
            bands = f" (image channels + {len(meta.add_dirs)} band(s): {', '.join(meta.add_dirs)})" if \
                meta.add_dirs else ""
            given, trained = channels - len(meta.add_dirs), meta.in_channels - len(meta.add_dirs)
            hint = {(4, 3): " (an alpha channel? save them as RGB)", (3, 1): " (colour for grey: convert them to grey)",
                    (1, 3): " (grey for colour: the model needs colour images)"}.get((given, trained), "")
            return (f"{name}: {channels} channel(s), but the model was trained on {meta.in_channels}{bands}; give "
                    f"images with the training layout{hint}")
        parts, trained_parts = self.part_types(types or dtype), self.part_types(meta.types or meta.dtype)
        if parts == trained_parts or (dtype == meta.dtype and not meta.types):
            return None
        lo, hi = min(meta.stats.min), max(meta.stats.max)
        span = max(hi - lo, 1e-6)
        inside = low is not None and high is not None and lo - span / 2 <= low and high <= hi + span / 2
        if inside or (low is None and np.dtype(dtype).kind == np.dtype(meta.dtype).kind == "f"):
            warn(f"{name} is {types or dtype} but the model was trained on {meta.types or meta.dtype} images; its "
                 "values lie in the training range, so it is used as it is")
            return None
        seen = f" with values {low:g}..{high:g}" if low is not None else ""
        odd = [f"{band} is {t}, {want} in training" for band, t, want in zip(
            ["image", *(f"band {b}" for b in meta.add_dirs)], parts, trained_parts, strict=True) if t != want]
        what = f"its {'; '.join(odd)}" if len(set(trained_parts)) > 1 or len(set(parts)) > 1 else \
            f"it is {dtype}{seen}, but the model was trained on {meta.dtype} images (values {lo:g}..{hi:g})"
        return (f"{name}: {what}; convert it to the training images' pixel type ({meta.types or meta.dtype}), or "
                "train on such images")

    def part_types(self, types: str) -> list[str]:
        """"uint8" or "uint16 image + uint8 nir" as one pixel type per part (the image, then each band)."""
        named = dict(reversed(t.split(" ", 1)) for t in types.split(" + ")) if " + " in types else {}
        return [named.get(part, types) for part in ["image", *self.meta.add_dirs]]
