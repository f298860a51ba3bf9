"""Does predict.py --uncertainty pick better images to label next than chance? An active-learning round on a shared
dataset, over a few seeds.

  python bench/active.py                                  # water_s2l8, 16 labelled + 16 more, --budget 60s runs
  python bench/active.py --data ../shared/data/dsb2018_nuclei --start 24 -k 24 --budget 90

Per seed: a random start set of --start training images is "labelled"; a model trained on it (--budget) predicts the
rest of the training images (the unlabelled pool) with --uncertainty; then two models are trained from scratch with
the same budget, one on the start set plus the -k most uncertain pool images, one plus -k random ones. Prints the
best val mIoU of the three, per seed and on average.
"""
import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water_s2l8")
    p.add_argument("--add-dirs", default="nir")
    p.add_argument("--start", type=int, default=16, help="labelled images to start from (16)")
    p.add_argument("-k", type=int, default=16, help="images labelled next (16)")
    p.add_argument("--budget", type=float, default=60, help="seconds per training run (60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return p


def labelled(src: Path, dst: Path, stems: list[str]) -> Path:
    """A dataset of src's val split and the training images `stems`, as links."""
    for split, keep in (("train", set(stems)), ("val", None)):
        for folder in (src / split).iterdir():
            (dst / split / folder.name).mkdir(parents=True)
            for f in folder.iterdir():
                if keep is None or f.stem in keep:
                    os.symlink(f, dst / split / folder.name / f.name)
    return dst


def train(data: Path, logs: Path, name: str, args: argparse.Namespace, seed: int) -> float:
    flags = ["-d", data, "--add-dirs", args.add_dirs, "-m", "unet", "--encoder", "resnet18", "--encoder-weights",
             "none", "--cpu", "--budget", f"{args.budget:g}s", "--seed", seed, "-log", logs, "--exp-name", name]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, flags)], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        sys.exit(f"{name}: {r.stderr[-400:]}")
    with open(logs / name / "metrics.csv", newline="") as f:
        return max(float(row["val_miou"]) for row in csv.DictReader(f) if row.get("val_miou"))


def most_uncertain(model: Path, pool: Path, out: Path, k: int) -> list[str]:
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), "-m", str(model), "-i", str(pool), "-o", str(out),
                        "--cpu", "--uncertainty"], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        sys.exit(f"predict.py: {r.stderr[-400:]}")
    with open(out / "uncertainty.csv", newline="") as f:
        return [Path(row["image"]).stem for row in csv.DictReader(f)][:k]


def main(args: argparse.Namespace) -> None:
    stems = sorted(p.stem for p in (args.data / "train" / "images").iterdir())
    lines = [f"{'seed':>4} {'start':>7} {'+uncertain':>10} {'+random':>8}"]
    totals = [0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory(prefix="segkit-active-") as tmp:
        for seed in args.seeds:
            work = Path(tmp) / str(seed)
            rng = random.Random(seed)
            start = rng.sample(stems, args.start)
            pool = [s for s in stems if s not in start]
            base = train(labelled(args.data, work / "start", start), work / "logs", "start", args, seed)
            pool_dir = work / "pool" / "images"
            pool_dir.mkdir(parents=True)
            for folder in (args.data / "train").iterdir():  # the pool's images and their bands, no masks
                if folder.name != "gt":
                    (work / "pool" / folder.name).mkdir(exist_ok=True)
                    for f in folder.iterdir():
                        if f.stem in pool:
                            os.symlink(f, work / "pool" / folder.name / f.name)
            picked = most_uncertain(work / "logs" / "start", pool_dir, work / "predicted", args.k)
            chance = rng.sample(pool, args.k)
            a = train(labelled(args.data, work / "a", start + picked), work / "logs", "uncertain", args, seed)
            b = train(labelled(args.data, work / "b", start + chance), work / "logs", "random", args, seed)
            totals = [t + v for t, v in zip(totals, (base, a, b), strict=True)]
            lines.append(f"{seed:>4} {base:>7.4f} {a:>10.4f} {b:>8.4f}")
            print(lines[-1], flush=True)
    n = len(args.seeds)
    lines.append(f"{'mean':>4} {totals[0] / n:>7.4f} {totals[1] / n:>10.4f} {totals[2] / n:>8.4f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
