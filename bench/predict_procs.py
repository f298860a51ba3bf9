"""predict.py throughput in one process and under torchrun with several, on the same inputs; the masks compared.

  python bench/predict_procs.py -m logs/exp/best.pth -i ../shared/data/water_s2l8/val/images --cpu
  python bench/predict_procs.py -m logs/exp/best.pth -i scenes.txt --procs 1 2 4 8      # a machine with 8 GPUs

Each run is the whole command (start-up included) into a fresh folder; the first is the reference that every other
run's masks must equal byte for byte. Prints one table: wall time, images/s, megapixels/s, speed-up, identical.
"""
import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fileio import image_header  # noqa: E402
from predict import list_images  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="checkpoint, experiment folder or bundle")
    p.add_argument("-i", "--input", required=True, help="an image folder or a .txt list, as predict.py takes")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to run (1 2)")
    p.add_argument("--cpu", action="store_true", help="predict on the CPU (torchrun processes share its cores)")
    return p


def predict(args: argparse.Namespace, procs: int, out: Path) -> float:
    """Wall seconds of one predict.py command with `procs` processes (torchrun from 2 on)."""
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={procs}"]
    cmd = [*launch, str(ROOT / "predict.py"), "-m", args.model, "-i", args.input, "-o", str(out)]
    t0 = time.monotonic()
    r = subprocess.run(cmd + (["--cpu"] if args.cpu else []), capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        sys.exit(f"predict.py with {procs} process(es) failed: {r.stderr[-600:]}")
    return time.monotonic() - t0


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False)
                                                                for n in names)


def main(args: argparse.Namespace) -> None:
    images = list_images(Path(args.input))
    mpx = sum(h.height * h.width for h in map(image_header, images)) / 1e6
    print(f"{len(images)} images, {mpx:.1f} Mpx; model {args.model}")
    print("| processes | wall s | images/s | Mpx/s | speed-up | masks identical to the first run |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for n in args.procs:
            out = Path(tmp) / f"p{n}"
            wall = predict(args, n, out)
            first = first or (out, wall)
            print(f"| {n} | {wall:.1f} | {len(images) / wall:.2f} | {mpx / wall:.3f} | {first[1] / wall:.2f} | "
                  f"{'yes' if same_files(first[0], out) else 'NO'} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
