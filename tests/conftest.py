"""Shared helpers: tiny generated datasets and running the scripts through their command lines."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may wait on the network

from fileio import write_image  # noqa: E402

# Fast training flags: tiny crops, one epoch, no pretrained weights, no worker processes.
FAST = ["-m", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "32", "-b", "2",
        "-e", "1", "--cpu", "-w", "0"]


def blob_mask(rng: np.random.Generator, h: int, w: int, values: tuple[int, ...]) -> np.ndarray:
    """A mask of discs, one disc per label value, on background 0."""
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint16 if max(values) > 255 else np.uint8)
    for v in values:
        cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), rng.integers(4, h // 3)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
    return mask


def make_dataset(root: Path, n_train: int = 6, n_val: int = 3, size: tuple[int, int] = (48, 64), channels: int = 3,
                 dtype=np.uint8, bands: tuple[str, ...] = (), values: tuple[int, ...] = (255,), ext: str = ".png",
                 seed: int = 0) -> Path:
    """<root>/{train,val}/{images,gt,<bands>}: images brighter where the mask has a class, so a model can learn."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for folder in ("images", "gt", *bands):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
    top = {np.uint8: 255, np.uint16: 10000, np.float32: 1.0}[dtype]
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            h, w = size
            mask = blob_mask(rng, h, w, values)
            signal = (mask > 0).astype(np.float32) * (0.3 + 0.5 * np.isin(mask, values[1:]))
            base = rng.uniform(0.1, 0.4, (h, w, channels)) + signal[..., None] * 0.5
            image = (np.clip(base, 0, 1) * top).astype(dtype)
            stem = f"{split[0]}{i:03d}"
            write_image(root / split / "images" / f"{stem}{ext}", image[..., 0] if channels == 1 else image)
            write_image(root / split / "gt" / f"{stem}.png", mask)
            for band in bands:
                write_image(root / split / band / f"{stem}{ext}", (np.clip(base[..., 0], 0, 1) * top).astype(dtype))
    return root


def make_trainer(args, exp: Path, procs):
    """train.py's own pieces, from its parsed flags to a Trainer and its val sets, without training."""
    import train
    from labels import Labels
    from trainer import Trainer

    labels = Labels.from_args(args.class_list, args.max_mask_val, args.ignore_label, args.class_names)
    splits = train.find_splits(args)
    data, workers = train.check_data(args, splits, labels, exp, procs)
    model, meta, _ = train.make_model(args, data, labels, None, procs)
    train_loader, evals = train.make_loaders(args, splits, data, meta, workers, procs)
    return Trainer(train.train_config(args, exp, procs), model, train_loader, evals, meta), evals


# A GeoTIFF georeference: pixel scale, tie point, GeoKeyDirectory (UTM zone 33N).
GEO = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0), True),
       (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True)]


def make_checkpoint(path: Path, arch="unet", encoder="resnet18", values=(255,), add_dirs=(), dtype="uint16",
                    top=10000.0, tile=64, threshold=0.5, names=(), train_args=None) -> Path:
    """A segkit checkpoint of an untrained network: enough to test everything but the quality of the masks."""
    import torch

    import checkpoint
    from checkpoint import Checkpoint, ModelMeta
    from labels import ChannelStats, Labels
    from model import build_model

    torch.manual_seed(0)
    labels = Labels(list(values), given_names=list(names))
    channels = 3 + len(add_dirs)
    stats = ChannelStats([top / 3] * channels, [top / 6] * channels, [0.0] * channels, [top] * channels,
                         [1] * labels.num_classes)
    meta = ModelMeta(arch=arch, encoder=encoder, in_channels=channels, out_channels=labels.out_channels,
                     labels=labels, add_dirs=list(add_dirs), stats=stats, dtype=dtype, image_size=64, resize=False,
                     val_tile_size=tile, threshold=threshold, train_args=train_args or {})
    net, _ = build_model(meta)
    checkpoint.save(path, Checkpoint(net.eval().state_dict(), meta, 1, 0.5))
    return path


def network(arch: str, encoder: str, in_channels: int, out_channels: int, weights: str = "none"):
    """model.build_model for a network alone: (model, where its weights came from)."""
    from checkpoint import ModelMeta
    from labels import ChannelStats, Labels
    from model import build_model

    labels = Labels([255])  # not read: the network is the architecture, encoder, channels and outputs
    stats = ChannelStats([0.5] * in_channels, [0.2] * in_channels, [0.0] * in_channels, [1.0] * in_channels, [1])
    return build_model(ModelMeta(arch=arch, encoder=encoder, in_channels=in_channels, out_channels=out_channels,
                                 labels=labels, add_dirs=[], stats=stats, dtype="uint8", image_size=64,
                                 resize=False, val_tile_size=64), weights)


def run_script(script: str, *args, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the kit's scripts as a user would, with this interpreter, offline (env: more variables)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def broken_package(folder: Path, name: str, error: str = "ImportError") -> dict:
    """The environment under which package `name` fails to import, as a broken install does."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f"raise {error}('broken {name} (planted by a test)')\n")
    return {"PYTHONPATH": str(folder)}


def can_mount_tmpfs() -> bool:
    """Root with unshare: a private, small file system (/dev/shm, a log folder) can be mounted for one command."""
    return shutil.which("unshare") is not None and os.geteuid() == 0 and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one `error:` message naming every needle."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.returncode == 2, out
    assert "error:" in out, out
    for n in needles:
        assert n in out, f"{n!r} not in: {out}"
    return out


@pytest.fixture
def binary_ds(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")
