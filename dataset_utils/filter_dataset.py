"""Drop samples with too little foreground or too much nodata: list the ones kept, or move the rest aside.

  python dataset_utils/filter_dataset.py my_data --min-fg 0.01                  # report only
  python dataset_utils/filter_dataset.py my_data --drop-empty --move-to dropped/  # move empty samples away
  python dataset_utils/filter_dataset.py tiles --nodata 0 --max-nodata 0.5 --list kept.txt

Foreground is the share of mask pixels holding a class value (--class-list, default: any value but 0). Moving keeps
every file of a sample together (images, gt, bands) under DIR/<split>/<folder>/.
"""
import argparse
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from dataset import Sample, band_folders, pair_files, read_sample, split_folders
from errors import UserError, run_cli
from runtime import cpu_count


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="dataset root (train/, val/, ...) or one folder with images/ and gt/")
    p.add_argument("--min-fg", type=float, default=0.0, help="drop samples whose foreground share is below this")
    p.add_argument("--drop-empty", action="store_true", help="drop samples without any foreground pixel")
    p.add_argument("--class-list", default=None, help="mask values that count as foreground (default: all but 0)")
    p.add_argument("--nodata", type=float, default=None, help="image value meaning 'no data' (all bands equal it)")
    p.add_argument("--max-nodata", type=float, default=0.5, help="with --nodata: drop samples with a larger share")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--move-to", help="move the dropped samples' files under this folder")
    act.add_argument("--list", help="write the kept samples (split/stem per line) to this file")
    return p


def measure(sample: Sample, fg_values: list[int] | None, nodata: float | None) -> tuple[float, float]:
    """(foreground share, nodata share) of one sample."""
    image, mask = read_sample(sample, None)
    fg = np.isin(mask, fg_values) if fg_values else mask > 0
    empty = (image == nodata).all(axis=2) if nodata is not None else np.zeros(1, bool)
    return float(fg.mean()), float(empty.mean())


def filter_dataset(args: argparse.Namespace) -> dict[str, list[str]]:
    try:
        fg_values = [int(v) for v in args.class_list.split()] if args.class_list else None
    except ValueError:
        raise UserError(f"--class-list '{args.class_list}' must be label values") from None
    if not (args.min_fg or args.drop_empty or args.nodata is not None):
        raise UserError("say what to drop: --min-fg SHARE, --drop-empty, or --nodata VALUE")
    dropped, kept = {}, []
    for split_dir in split_folders(Path(args.root)):
        samples, unpaired = pair_files(split_dir, band_folders(split_dir))
        if unpaired:
            raise UserError(f"{len(unpaired)} unpaired file(s) in {split_dir}, e.g. {unpaired[0]}; fix them first")
        with ThreadPoolExecutor(cpu_count()) as pool:
            shares = list(tqdm(pool.map(lambda s: measure(s, fg_values, args.nodata), samples), total=len(samples),
                               desc=f"reading {split_dir.name}", unit="sample", leave=False, dynamic_ncols=True))
        out = []
        for s, (fg, empty) in zip(samples, shares, strict=True):
            why = ("empty" if args.drop_empty and fg == 0 else f"foreground {fg:.4f}" if fg < args.min_fg else
                   f"nodata {empty:.2f}" if args.nodata is not None and empty > args.max_nodata else None)
            (out if why else kept).append((split_dir, s, why))
        dropped[split_dir.name] = out
        print(f"{split_dir.name}: {len(samples)} samples, {len(out)} to drop, {len(samples) - len(out)} kept")
    moved = 0
    if args.move_to:
        target = Path(args.move_to)
        for items in dropped.values():
            for split_dir, s, _ in items:
                for path in [s.image, s.mask, *s.bands]:
                    dest = target / split_dir.name / path.parent.name / path.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, dest)
                moved += 1
        print(f"moved {moved} samples to {target}")
    if args.list:
        Path(args.list).write_text("".join(f"{d.name}/{s.stem}\n" for d, s, _ in kept), encoding="utf-8")
        print(f"wrote {len(kept)} kept samples to {args.list}")
    if not (args.move_to or args.list):
        for items in dropped.values():
            for split_dir, s, why in items[:20]:
                print(f"  drop {split_dir.name}/{s.stem} ({why})")
        print("report only: add --move-to DIR or --list FILE to act on it")
    return {name: [s.stem for _, s, _ in items] for name, items in dropped.items()}


def main() -> int:
    filter_dataset(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
