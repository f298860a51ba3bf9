"""Prediction speed and peak memory on one large generated GeoTIFF scene, with PyTorch and with onnxruntime.

  python bench/prediction.py -m logs/exp/best.pth                 # a 3000 x 3000 scene
  python bench/prediction.py -m logs/exp/best.pth --size 20000    # the big-raster case (long on a CPU)

Writes a tiled, Deflate-compressed scene with the model's bands (uint16 or its training type), exports the model
to a bundle, then runs predict.py on the scene with the checkpoint and with the bundle, each in its own process:
megapixels per second (wall time of the whole command, start-up included) and the process's peak resident memory.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402


def make_scene(folder: Path, meta, size: int) -> Path:
    """Image (the model's image channels) and one file per extra band, written in rows of tiles."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(meta.dtype)
    top = float(max(meta.stats.max))
    bands = meta.in_channels - len(meta.add_dirs)
    paths = {"images": bands, **dict.fromkeys(meta.add_dirs, 1)}
    for name, channels in paths.items():
        (folder / name).mkdir(parents=True, exist_ok=True)

        def rows(c=channels):  # full 512 x 512 tiles, row by row (the edge tiles are cropped on writing)
            for _ in range(0, size, 512):
                block = rng.uniform(0, top, (512, size + 512, c)).astype(dtype)
                for x in range(0, size, 512):
                    yield block[:, x:x + 512] if c > 1 else block[:, x:x + 512, 0]

        shape = (size, size, channels) if channels > 1 else (size, size)
        tifffile.imwrite(folder / name / "scene.tif", rows(), shape=shape, dtype=dtype, tile=(512, 512),
                         compression="zlib", photometric="minisblack", planarconfig="contig",
                         extratags=[(33550, "d", 3, (10.0, 10.0, 0.0), True)])
    return folder / "images" / "scene.tif"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak MB) of one command in a child process."""
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.monotonic() - t0, int(r.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="a best.pth")
    p.add_argument("--size", type=int, default=3000, help="scene side in pixels (3000)")
    p.add_argument("--cpu", action="store_true", help="PyTorch on the CPU even where a GPU is present")
    args = p.parse_args()
    meta = checkpoint.load(Path(args.model)).meta
    with tempfile.TemporaryDirectory(prefix="segkit-bench-") as tmp:
        tmp = Path(tmp)
        scene = make_scene(tmp / "scene", meta, args.size)
        subprocess.run([sys.executable, "export.py", "-m", args.model, "-o", str(tmp / "bundle")], cwd=ROOT,
                       check=True, capture_output=True)
        rows = []
        for name, model in (("pytorch (checkpoint)", args.model), ("onnxruntime (bundle)", str(tmp / "bundle"))):
            cmd = [sys.executable, "predict.py", "-m", model, "-i", str(scene), "-o", str(tmp / name[:4])]
            seconds, peak = timed(cmd + (["--cpu"] if args.cpu else []))
            rows.append((name, args.size ** 2 / 1e6 / seconds, peak))
    print(f"\n{meta.arch}/{meta.encoder}, {meta.in_channels} bands {meta.dtype}, scene {args.size} x {args.size}, "
          f"peak memory of predict.py (ru_maxrss)")
    print(f"{'engine':<22} {'Mpx/s':>8} {'peak MB':>9}")
    for name, mpx, peak in rows:
        print(f"{name:<22} {mpx:>8.2f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
