"""Drop samples with too little foreground or too much nodata: list the ones kept, or move the rest aside.

  python dataset_utils/filter_dataset.py my_data --min-fg 0.01                  # report only
  python dataset_utils/filter_dataset.py my_data --drop-empty --move-to dropped/  # move empty samples away
  python dataset_utils/filter_dataset.py tiles --nodata 0 --max-nodata 0.5 --list kept.txt

Foreground is the share of mask pixels holding a class value (--class-list, default: any value but 0). Moving keeps
every file of a sample together (images, gt, bands) under DIR/<split>/<folder>/; the moves are planned in
DIR/.segkit-moves.json first, so a run interrupted while moving is finished by running the same command again.
Images with NaN pixels are found with --nodata nan.
"""
import argparse
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from cli import Parser, at_least, progress
from dataset import Sample, band_folders, pair_files, read_sample, split_folders
from errors import UserError, run_cli
from fileio import output_file, output_folder, read_json, write_text
from raster import nodata_pixels
from runtime import cpu_count

MOVES = ".segkit-moves.json"  # in the --move-to folder while files are being moved


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("root", help="dataset root (train/, val/, ...) or one folder with images/ and gt/")
    p.add_argument("--min-fg", type=at_least(0, float), default=0.0,
                   help="drop samples whose foreground share is below this")
    p.add_argument("--drop-empty", action="store_true", help="drop samples without any foreground pixel")
    p.add_argument("--class-list", default=None, help="mask values that count as foreground (default: all but 0)")
    p.add_argument("--nodata", type=float, default=None,
                   help="image value meaning 'no data' (all bands equal it); nan finds NaN pixels")
    p.add_argument("--max-nodata", type=at_least(0, float), default=0.5,
                   help="with --nodata: drop samples with a larger share")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--move-to", help="move the dropped samples' files under this folder")
    act.add_argument("--list", help="write the kept samples (split/stem per line) to this file")
    return p


def measure(sample: Sample, fg_values: list[int] | None, nodata: float | None) -> tuple[float, float]:
    """(foreground share, nodata share) of one sample."""
    image, mask = read_sample(sample, None)
    fg = np.isin(mask, fg_values) if fg_values else mask > 0
    empty = nodata_pixels(image, nodata) if nodata is not None else np.zeros(1, bool)
    return float(fg.mean()), float(empty.mean())


def move_samples(samples: list[tuple[Path, Sample]], target: Path) -> None:
    """Move every file of the samples under target/<split>/<folder>/: planned first (refusing to overwrite any
    file there), then moved one by one, the plan removed last."""
    output_folder(target, "--move-to")
    plan = [(str(path), str(target / split_dir.name / path.parent.name / path.name))
            for split_dir, s in samples for path in [s.image, s.mask, *s.bands]]
    taken = [dest for _, dest in plan if Path(dest).exists()]
    if taken:
        raise UserError(f"--move-to {target} already holds {taken[0]} (and {len(taken) - 1} more); nothing was "
                        "moved: choose an empty folder")
    write_text(target / MOVES, json.dumps(plan))
    finish_moves(target)
    print(f"moved {len(samples)} samples to {target}")


def finish_moves(target: Path) -> int:
    """Carry out the planned moves in target (those not done yet); the number of files in the plan."""
    plan = read_json(target / MOVES, f"finish the moves by hand, then remove {target / MOVES}", list)
    for src, dest in plan:
        if Path(src).exists() and not Path(dest).exists():
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest)
    (target / MOVES).unlink()
    return len(plan)


def filter_dataset(args: argparse.Namespace) -> dict[str, list[str]]:
    if args.move_to and (Path(args.move_to) / MOVES).exists():
        n = finish_moves(Path(args.move_to))
        print(f"finished an interrupted move of {n} files to {args.move_to}")
    try:
        fg_values = [int(v) for v in args.class_list.split()] if args.class_list else None
    except ValueError:
        raise UserError(f"--class-list '{args.class_list}' must be label values") from None
    if not (args.min_fg or args.drop_empty or args.nodata is not None):
        raise UserError("say what to drop: --min-fg SHARE, --drop-empty, or --nodata VALUE")
    if args.list:
        output_file(Path(args.list), "--list")
    dropped, kept = {}, []
    for split_dir in split_folders(Path(args.root)):
        samples, unpaired = pair_files(split_dir, band_folders(split_dir))
        if unpaired:
            raise UserError(f"{len(unpaired)} unpaired file(s) in {split_dir}, e.g. {unpaired[0]}; fix them first")
        with ThreadPoolExecutor(cpu_count()) as pool:
            shares = list(progress(pool.map(lambda s: measure(s, fg_values, args.nodata), samples),
                                   total=len(samples), desc=f"reading {split_dir.name}", unit="sample", leave=False))
        out = []
        for s, (fg, empty) in zip(samples, shares, strict=True):
            why = ("empty" if args.drop_empty and fg == 0 else f"foreground {fg:.4f}" if fg < args.min_fg else
                   f"nodata {empty:.2f}" if args.nodata is not None and empty > args.max_nodata else None)
            (out if why else kept).append((split_dir, s, why))
        dropped[split_dir.name] = out
        print(f"{split_dir.name}: {len(samples)} samples, {len(out)} to drop, {len(samples) - len(out)} kept")
    if args.move_to:
        move_samples([(d, s) for items in dropped.values() for d, s, _ in items], Path(args.move_to))
    if args.list:
        write_text(Path(args.list), "".join(f"{d.name}/{s.stem}\n" for d, s, _ in kept))
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
