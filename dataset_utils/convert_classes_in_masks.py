"""Change the label values of masks: remap values, or turn colour-painted masks into index masks.

  python dataset_utils/convert_classes_in_masks.py data/train/gt --map "64:1 128:2 255:0"
  python dataset_utils/convert_classes_in_masks.py painted/ -o data/train/gt --palette "0,0,255:1 255,0,0:2 0,0,0:0"

Without -o the folder is converted in place: every mask is first converted into a hidden folder inside it, then
each replaces its original in one rename; only the masks are touched (other files and subfolders stay as they are).
A run interrupted while converting leaves the masks as they were; one interrupted while replacing is finished by
running the same command again. Values not in --map are kept (or, with --unmapped, set to a value or reported as
an error); colours not in --palette are an error unless --unmapped sets them. JPEG masks are written as PNG (JPEG
would blur the labels again).
"""
import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from cli import Parser, progress
from errors import UserError, run_cli
from fileio import is_image_file, publish_folder, read_image, read_json, scratch_folder, write_image, write_text

WORK = ".segkit-converting"  # the in-place conversion's folder inside the mask folder
PLAN = "replace.json"  # written once every mask is converted: from then on the conversion only needs finishing


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("masks", help="folder of masks")
    p.add_argument("-o", "--output-dir", help="write converted masks here (a new folder) instead of in place")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--map", help='old:new value pairs, e.g. "64:1 128:2 255:0"; old may be a range: "1-127:0"')
    how.add_argument("--palette", help='R,G,B:value pairs for colour masks, e.g. "0,0,255:1 255,0,0:2"')
    p.add_argument("--unmapped", default=None,
                   help="values/colours not listed: 'error', or a value to set them to (default: --map keeps them, "
                        "--palette reports an error)")
    return p


def parse_pairs(text: str, flag: str, colour: bool) -> dict:
    """{old: new} from "old:new" items; old is a colour R,G,B (colour) or a value or a range of values LO-HI."""
    pairs = {}
    try:
        for item in text.replace(";", " ").split():
            old, new = item.rsplit(":", 1)
            if colour:
                keys = [tuple(int(v) for v in old.split(","))]
                if len(keys[0]) != 3:
                    raise ValueError
            else:
                lo, _, hi = old.partition("-")
                keys = list(range(int(lo), int(hi or lo) + 1))
                if not keys or keys[0] < 0 or keys[-1] > 65535:
                    raise ValueError
            pairs.update(dict.fromkeys(keys, int(new)))
    except ValueError:
        example = '"0,0,255:1 255,0,0:2"' if colour else '"64:1 128:2 255:0" or ranges, "1-127:0 128-254:255"'
        raise UserError(f"{flag} '{text}' must be pairs like {example}") from None
    if not pairs or min(pairs.values()) < 0 or max(pairs.values()) > 65535:
        raise UserError(f"{flag} '{text}': new values must be between 0 and 65535")
    return pairs


def convert_values(mask: np.ndarray, mapping: dict[int, int], unmapped: int | None) -> tuple[np.ndarray, list]:
    """Remapped mask and the values it held that the mapping does not list."""
    if mask.ndim != 2:
        raise ValueError("a value map needs one-channel masks; use --palette for colour masks")
    values = np.unique(mask)
    lut = {int(v): mapping.get(int(v), int(v) if unmapped is None else unmapped) for v in values}
    out = np.zeros(mask.shape, np.uint16 if max(lut.values()) > 255 else np.uint8)
    for v, new in lut.items():
        out[mask == v] = new
    return out, [int(v) for v in values if int(v) not in mapping]


def convert_colours(mask: np.ndarray, palette: dict[tuple, int], unmapped: int | None) -> tuple[np.ndarray, list]:
    """Index mask from an RGB(A) mask and the colours it held that the palette does not list (with pixel counts)."""
    if mask.ndim != 3 or mask.shape[2] < 3:
        raise ValueError("--palette needs RGB colour masks; this one has one channel (use --map)")
    rgb = mask[..., :3].astype(np.uint32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    codes, counts = np.unique(code, return_counts=True)
    out = np.full(code.shape, 0 if unmapped is None else unmapped, np.uint16)
    unknown = []
    for c, n in zip(codes.tolist(), counts.tolist(), strict=True):
        colour = (c >> 16, (c >> 8) & 255, c & 255)
        if colour in palette:
            out[code == c] = palette[colour]
        else:
            unknown.append((colour, n))
    return (out.astype(np.uint8) if out.max(initial=0) <= 255 else out), unknown


def convert_all(files: list[Path], into: Path, convert, strict: bool, colour: bool) -> tuple[Counter, dict]:
    """Write each converted mask into `into`; (label values now, new name -> original file). Unlisted values or
    colours, with strict, are collected and reported together with nothing written where the user sees it."""
    after, problems, names = Counter(), [], {}
    for path in progress(files, desc="converting", unit="mask"):
        try:
            new, rest = convert(read_image(path))
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        if strict and rest:
            shown = ", ".join(f"{c} ({n} px)" for c, n in rest[:5]) if colour else ", ".join(map(str, rest[:5]))
            problems.append(f"{path}: {'colours' if colour else 'values'} not listed: {shown}")
            continue
        after.update(np.unique(new).tolist())
        name = f"{path.stem}.png" if path.suffix.lower() in (".jpg", ".jpeg") else path.name
        if name in names:
            raise UserError(f"{path} and {names[name]} would both become {name}; rename one of them first")
        write_image(into / name, new, atomic=False)  # the whole folder is published or discarded at once
        names[name] = path
    if problems:
        raise UserError(f"{len(problems)} mask(s) hold {'colours' if colour else 'values'} that are not listed; "
                        "add them, or set them with --unmapped VALUE; nothing was changed:\n  "
                        + "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more"
                                                         if len(problems) > 10 else ""))
    return after, names


def replace_in_place(folder: Path, work: Path) -> int:
    """Move every converted mask of a finished conversion over its original (a JPEG's PNG replaces the JPEG),
    keeping the original's permissions."""
    plan = read_json(work / PLAN, f"remove the folder {work} and convert again")
    for name, original in plan.items():
        if (work / name).exists():
            if (folder / original).exists():
                shutil.copymode(folder / original, work / name)
            os.replace(work / name, folder / name)
        if original != name:
            (folder / original).unlink(missing_ok=True)
    shutil.rmtree(work)
    return len(plan)


def convert(args: argparse.Namespace) -> Counter | None:
    folder = Path(args.masks)
    if not folder.is_dir():
        raise UserError(f"{folder}: mask folder not found")
    work = folder / WORK
    if not args.output_dir and (work / PLAN).exists():
        n = replace_in_place(folder, work)
        print(f"finished an interrupted conversion: {n} masks in {folder} are converted (not converted again)")
        return None
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise UserError(f"{folder} holds no mask images")
    colour = args.palette is not None
    pairs = parse_pairs(args.palette if colour else args.map, "--palette" if colour else "--map", colour)
    strict = args.unmapped == "error" or (colour and args.unmapped is None)
    try:
        unmapped = None if args.unmapped in (None, "error") else int(args.unmapped)
    except ValueError:
        raise UserError(f"--unmapped {args.unmapped} must be 'error' or a value") from None
    if unmapped is not None and not 0 <= unmapped <= 65535:
        raise UserError(f"--unmapped {unmapped} must be a label value between 0 and 65535")

    def one(mask: np.ndarray):
        return (convert_colours if colour else convert_values)(mask, pairs, unmapped)

    if args.output_dir:
        out = Path(args.output_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"-o {out} already exists and is not an empty folder; choose a new folder or convert in "
                            "place")
        with scratch_folder(out) as scratch:
            after, _ = convert_all(files, scratch, one, strict, colour)
            publish_folder(scratch, out)
    else:
        shutil.rmtree(work, ignore_errors=True)  # a conversion interrupted before it was complete: start over
        try:
            work.mkdir()
        except OSError as e:
            raise UserError(f"{folder}: cannot write there ({e.strerror}); convert into a new folder with -o") from None
        try:
            after, names = convert_all(files, work, one, strict, colour)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        write_text(work / PLAN, json.dumps({name: path.name for name, path in names.items()}))
        replace_in_place(folder, work)
    where = f"into {args.output_dir}" if args.output_dir else f"in place in {folder}"
    print(f"converted {len(files)} masks {where}; label values now {', '.join(map(str, sorted(after)))}")
    return after


def main() -> int:
    convert(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
