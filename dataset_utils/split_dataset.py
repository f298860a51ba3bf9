"""Split one folder of samples into train/ and val/ (and test/), by ratio, reproducibly.

  python dataset_utils/split_dataset.py all_tiles -o my_data --val 0.2 --test 0.1 --by-prefix --mode hardlink

SRC holds images/, optionally gt/, and extra band folders; every file of a sample goes to the same split. With
--by-prefix, tiles cut from one scene (<scene>_r<row>_c<col>, as split_big_image_to_tiles.py names them) stay on one
side, so validation never sees a neighbour of a training tile. The split is written to a temporary folder and
renamed into place, with split.json listing which sample went where.
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import Parser, at_least, fraction
from dataset import band_folders, pair_files
from errors import UserError, run_cli
from fileio import dead_link, publish_folder, scratch_folder

SCENE = r"^(.+)_r\d+_c\d+$"


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("src", help="folder with images/, optional gt/ and band folders")
    p.add_argument("-o", "--output-dir", required=True, help="new dataset root: train/, val/ (and test/) go here")
    p.add_argument("--val", type=fraction, default=0.2, help="share of samples for val/ (0.2)")
    p.add_argument("--test", type=fraction, default=0.0, help="share of samples for test/ (0)")
    p.add_argument("--seed", type=at_least(0), default=0, help="the same seed gives the same split (0)")
    p.add_argument("--mode", choices=["copy", "hardlink", "symlink"], default="copy",
                   help="how files reach the new folders: copies, hard links (no extra space, same disk), or "
                        "symbolic links (copy)")
    p.add_argument("--by-prefix", action="store_true",
                   help="keep the tiles of one scene together (scene = the name before _r<row>_c<col>)")
    p.add_argument("--prefix-regex", default=SCENE,
                   help=f"with --by-prefix: regex whose first group is the scene of a file stem ({SCENE})")
    return p


def assign(groups: dict[str, list], val: float, test: float, seed: int) -> dict[str, str]:
    """group -> split, filling test then val up to their share of samples, in a seeded random order."""
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    total = sum(len(g) for g in groups.values())
    targets = [("test", round(test * total)), ("val", round(val * total))]
    placed = {"test": 0, "val": 0}
    result = {}
    for key in order:
        split = next((s for s, want in targets if placed[s] < want), "train")
        placed[split] = placed.get(split, 0) + len(groups[key])
        result[key] = split
    return result


def split(args: argparse.Namespace) -> dict[str, list[str]]:
    src, out = Path(args.src), Path(args.output_dir)
    if args.val == 0 or args.val + args.test >= 1:
        raise UserError(f"--val {args.val} and --test {args.test} must be shares between 0 and 1 that leave some "
                        "samples for training")
    bands = band_folders(src) if src.is_dir() else []
    samples, unpaired = pair_files(src, bands, masks="optional")
    if unpaired:
        raise UserError(f"{len(unpaired)} unpaired file(s) in {src}, e.g. {unpaired[0]}; fix them first "
                        "(dataset_utils/check_dataset.py lists them all)")
    dead = [p for s in samples for p in (s.image, s.mask, *s.bands) if p and not p.exists()]
    if dead:
        raise dead_link(dead[0], len(dead) - 1)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"-o {out} already exists and is not empty (or not a folder); choose a new folder")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"-o {out} is inside the source folder {src}; choose a folder outside it")
    groups: dict[str, list] = defaultdict(list)
    try:
        pattern = re.compile(args.prefix_regex)
    except re.error as e:
        raise UserError(f"--prefix-regex {args.prefix_regex}: not a regular expression ({e})") from None
    if pattern.groups < 1:
        raise UserError(f"--prefix-regex {args.prefix_regex} needs a group, (...), around the scene name")
    for s in samples:
        m = pattern.match(s.stem) if args.by_prefix else None
        groups[m.group(1) if m else s.stem].append(s)
    if args.by_prefix and len(groups) < 2:
        raise UserError(f"--by-prefix found {len(groups)} scene(s) in {src}; tiles of one scene cannot be split")
    where = assign(groups, args.val, args.test, args.seed)
    link = {"copy": shutil.copy2, "hardlink": os.link, "symlink": lambda a, b: os.symlink(Path(a).resolve(), b)}
    listing: dict[str, list[str]] = defaultdict(list)
    with scratch_folder(out) as scratch:
        try:
            for key, members in groups.items():
                for s in members:
                    dest = scratch / where[key]
                    files = {"images": s.image, **({"gt": s.mask} if s.mask else {}),
                             **dict(zip(bands, s.bands, strict=True))}
                    for folder, path in files.items():
                        (dest / folder).mkdir(parents=True, exist_ok=True)
                        link[args.mode](path, dest / folder / path.name)
                    listing[where[key]].append(s.stem)
            (scratch / "split.json").write_text(json.dumps({"source": str(src), "seed": args.seed, "by_prefix":
                                                            args.by_prefix, **listing}, indent=1), encoding="utf-8")
            publish_folder(scratch, out)
        except OSError as e:
            hint = "; hard links need the same disk: use --mode copy" if args.mode == "hardlink" else ""
            raise UserError(f"could not write the split to {out} ({e.strerror}){hint}; nothing was written") from None
    counts = ", ".join(f"{s} {len(listing[s])}" for s in ("train", "val", "test") if listing.get(s))
    scenes = f" from {len(groups)} scenes" if args.by_prefix else ""
    print(f"{len(samples)} samples{scenes} -> {counts} in {out} ({args.mode}; folders: "
          f"{', '.join(['images', *(['gt'] if samples[0].mask else []), *bands])})")
    return dict(listing)


def main() -> int:
    split(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
