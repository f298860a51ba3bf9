"""Wall-clock cost of whole train.py runs, set against their epochs' own compute.

  python bench/walltime.py                                              # isbi_em, unet/resnet18, b 8, 30 epochs
  python bench/walltime.py --data ../shared/data/water_s2l8 -e 10 -- --add-dirs nir -b 16

Runs train.py twice in a fresh log folder: run 1 checks the data, run 2 (a new experiment on the same folder) finds
that check cached. Every output line is timestamped as it is printed. For each run:
  wall       launch to exit
  help       `train.py --help`, launch to exit
  start-up   launch to the start of epoch 1's compute (epoch 1's summary time minus its time_s)
  compute    the epochs' own compute: the sum of metrics.csv's time_s (training and validation)
  between    per-epoch overhead: wall time between the first and last summary over those epochs' compute, minus 1
  tail       last summary to exit (the last checkpoint write, shutting the loaders down)
  ratio      wall / (compute + start-up): 1.0 means nothing happens outside the epochs and the start-up
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isbi_em"), help="dataset root")
    p.add_argument("-e", "--epochs", type=int, default=30)
    p.add_argument("--python", default=sys.executable, help="the python that runs train.py")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    return p


def timed_run(cmd: list[str]) -> tuple[float, dict[int, float], list[str]]:
    """(wall seconds, epoch -> seconds from launch when its summary was printed, last output lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, buf, tail = {}, b"", []
    for chunk in iter(lambda: p.stdout.read1(4096), b""):
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        for line in lines:
            text = line.decode(errors="replace").strip()
            tail = [*tail, text][-4:] if text else tail
            m = re.match(r"epoch (\d+)/\d+\s+train_loss", text)
            if m:
                seen[int(m.group(1))] = time.monotonic() - t0
    if p.wait() != 0:
        sys.exit("train.py failed: " + " | ".join(tail))
    return time.monotonic() - t0, seen, tail


def measure(args: argparse.Namespace, log: Path, name: str) -> dict:
    cmd = [args.python, "train.py", "-d", args.data, "-e", str(args.epochs), "-log", str(log), "--exp-name", name,
           "-m", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "-b", "8", *args.train_args]
    wall, seen, _ = timed_run(cmd)
    with open(log / name / "metrics.csv", newline="") as f:
        compute = {int(r["epoch"]): float(r["time_s"]) for r in csv.DictReader(f)}
    first, last = min(seen), max(seen)
    startup = seen[first] - compute[first]
    own = sum(compute.values())
    between = (seen[last] - seen[first]) / max(sum(v for e, v in compute.items() if e > first), 1e-9) - 1
    return {"wall": wall, "startup": startup, "compute": own, "between": between, "tail": wall - seen[last],
            "ratio": wall / (own + startup), "epochs": len(compute)}


def main() -> None:
    args = get_args_parser().parse_args()
    t0 = time.monotonic()
    subprocess.run([args.python, "train.py", "--help"], cwd=ROOT, capture_output=True, check=True)
    help_s = time.monotonic() - t0
    with tempfile.TemporaryDirectory(prefix="segkit-walltime-") as tmp:
        runs = {"1 (data checked)": measure(args, Path(tmp), "a"), "2 (check cached)": measure(args, Path(tmp), "b")}
    print(f"\ntrain.py on {args.data}, {args.epochs} epochs, {' '.join(args.train_args) or 'defaults'}; "
          f"--help {help_s:.2f} s")
    print(f"{'run':<18} {'wall s':>8} {'start-up s':>10} {'compute s':>10} {'between':>8} {'tail s':>7} {'ratio':>6}")
    for name, r in runs.items():
        print(f"{name:<18} {r['wall']:>8.1f} {r['startup']:>10.1f} {r['compute']:>10.1f} {r['between']:>8.1%} "
              f"{r['tail']:>7.1f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
