"""Change the label values of masks: remap values, or turn colour-painted masks into index masks.

  python dataset_utils/convert_classes_in_masks.py data/train/gt --map "64:1 128:2 255:0"
  python dataset_utils/convert_classes_in_masks.py painted/ -o data/train/gt --palette "0,0,255:1 255,0,0:2 0,0,0:0"

Without -o the folder is converted in place: all masks are written to a temporary folder first and swapped in at the
end, so an interrupted run leaves the masks as they were. Values not in --map are kept (or, with --unmapped, set to
a value or reported as an error); colours not in --palette are an error unless --unmapped sets them.
JPEG masks are written as PNG (JPEG would blur the labels again).
"""
import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from errors import UserError, run_cli
from fileio import is_image_file, read_image, write_image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("masks", help="folder of masks")
    p.add_argument("-o", "--output-dir", help="write converted masks here (a new folder) instead of in place")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--map", help='old:new value pairs, e.g. "64:1 128:2 255:0"')
    how.add_argument("--palette", help='R,G,B:value pairs for colour masks, e.g. "0,0,255:1 255,0,0:2"')
    p.add_argument("--unmapped", default=None,
                   help="values/colours not listed: 'error', or a value to set them to (default: --map keeps them, "
                        "--palette reports an error)")
    return p


def parse_pairs(text: str, flag: str, colour: bool) -> dict:
    pairs = {}
    try:
        for item in text.replace(";", " ").split():
            old, new = item.rsplit(":", 1)
            key = tuple(int(v) for v in old.split(",")) if colour else int(old)
            if colour and len(key) != 3:
                raise ValueError
            pairs[key] = int(new)
    except ValueError:
        example = '"0,0,255:1 255,0,0:2"' if colour else '"64:1 128:2 255:0"'
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


def convert(args: argparse.Namespace) -> Counter:
    folder = Path(args.masks)
    if not folder.is_dir():
        raise UserError(f"{folder}: mask folder not found")
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
    out = Path(args.output_dir) if args.output_dir else folder
    if args.output_dir and out.exists() and any(out.iterdir()):
        raise UserError(f"-o {out} already exists and is not empty; choose a new folder or convert in place")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write next to {out} ({e.strerror})") from None
    after, problems = Counter(), []
    try:
        for path in tqdm(files, desc="converting", unit="mask", dynamic_ncols=True):
            mask = read_image(path)
            try:
                new, rest = (convert_colours if colour else convert_values)(mask, pairs, unmapped)
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
            if strict and rest:
                shown = ", ".join(f"{c} ({n} px)" for c, n in rest[:5]) if colour else ", ".join(map(str, rest[:5]))
                problems.append(f"{path}: {'colours' if colour else 'values'} not listed: {shown}")
                continue
            after.update(np.unique(new).tolist())
            ext = ".png" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix
            write_image(scratch / f"{path.stem}{ext}", new, atomic=False)  # the scratch folder is swapped in whole
        if problems:
            raise UserError(f"{len(problems)} mask(s) hold {'colours' if colour else 'values'} that are not listed; "
                            "add them, or set them with --unmapped VALUE; nothing was changed:\n  "
                            + "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more"
                                                            if len(problems) > 10 else ""))
        if args.output_dir:
            if out.exists():
                out.rmdir()
            scratch.rename(out)
        else:  # swap the folders, keeping any other files the user had in it
            for p in folder.iterdir():
                if not is_image_file(p) and p.is_file():
                    shutil.copy2(p, scratch / p.name)
            old = folder.with_name(f".{folder.name}.old")
            folder.rename(old)
            scratch.rename(folder)
            shutil.rmtree(old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"converted {len(files)} masks {'in place in' if not args.output_dir else 'into'} {out}; label values now "
          f"{', '.join(map(str, sorted(after)))}")
    return after


def main() -> int:
    convert(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
