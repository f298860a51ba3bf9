"""train.py --budget against the default flags given the same wall time, on the shared datasets.

  python bench/budget.py                                  # 150 s each, unet/resnet18 from scratch, on the CPU
  python bench/budget.py --budget 600 --sets isbi_em water_s2l8 -- --encoder resnet34

For each dataset (a subset of at most --train / --val images, first by name): `train.py --budget B`, then a 2-epoch
run of the default flags to time an epoch and the start-up, then the defaults for as many epochs as fit B. Prints one
table: each run's wall time, best val mIoU and (budget run) epochs trained, and the plan's first choices: crop, batch,
loss, repeats, epochs (re-planned as the run goes) and augmentation.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BANDS = {"water_s2l8": ["--add-dirs", "nir"], "naip_landcover": ["--add-dirs", "nir", "--class-list", "1 2 3 4 5"]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150, help="seconds (150)")
    p.add_argument("--sets", nargs="+", default=["water_s2l8", "naip_landcover", "isbi_em", "dsb2018_nuclei"])
    p.add_argument("--train", type=int, default=64, help="training images per set, at most (64)")
    p.add_argument("--val", type=int, default=16, help="val images per set, at most (16)")
    p.add_argument("extra", nargs="*", help="more train.py flags for every run, after --")
    return p


def subset(src: Path, dst: Path, counts: dict) -> Path:
    """Links to the first images (by name) of each split, with every folder of theirs."""
    for split, n in counts.items():
        stems = sorted(p.stem for p in (src / split / "images").iterdir())[:n]
        for folder in (src / split).iterdir():
            (dst / split / folder.name).mkdir(parents=True, exist_ok=True)
            files = {p.stem: p for p in folder.iterdir()}
            for s in stems:
                if s in files:
                    os.symlink(files[s], dst / split / folder.name / files[s].name)
    return dst


def train(data: Path, logs: Path, name: str, flags: list[str]) -> tuple[float, list[dict]]:
    cmd = [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-log", str(logs), "--exp-name", name, *flags]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"{name}: train.py failed: {r.stderr[-400:]}")
    with open(logs / name / "metrics.csv", newline="") as f:
        return wall, list(csv.DictReader(f))


def best(rows: list[dict]) -> float:
    return max(float(r["val_miou"]) for r in rows if r.get("val_miou"))


def main(args: argparse.Namespace) -> None:
    model = ["-m", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--cpu", *args.extra]
    lines = [f"{'dataset':<16} {'budget run':>10} {'epochs':>6} {'mIoU':>6} | {'defaults':>12} {'wall':>5} "
             f"{'mIoU':>6} | plan"]
    with tempfile.TemporaryDirectory(prefix="segkit-budget-") as tmp:
        for name in args.sets:
            data = subset(DATA / name, Path(tmp) / name, {"train": args.train, "val": args.val})
            flags = [*BANDS.get(name, []), *model]
            logs = Path(tmp) / "logs"
            wall, rows = train(data, logs, f"{name}_budget", [*flags, "--budget", f"{args.budget:g}s"])
            plan = json.loads((logs / f"{name}_budget" / "plan.json").read_text())["choices"]
            cal_wall, cal = train(data, logs, f"{name}_cal", [*flags, "-e", "2"])
            per_epoch = float(cal[-1]["time_s"]) * 1.1
            epochs = max(1, int((args.budget - max(0.0, cal_wall - 2 * per_epoch)) / per_epoch))
            d_wall, d_rows = train(data, logs, f"{name}_default", [*flags, "-e", str(epochs)])
            shown = ", ".join(f"{k} {plan[k]['value']}" for k in ("image_size", "batch_size", "loss", "repeats",
                                                                   "epochs", "aug") if k in plan)
            lines.append(f"{name:<16} {wall:>9.0f}s {len(rows):>6} {best(rows):>6.3f} | {epochs:>5} epochs "
                         f"{d_wall:>4.0f}s {best(d_rows):>6.3f} | {shown}")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
