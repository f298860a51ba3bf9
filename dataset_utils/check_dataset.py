"""The dataset doctor: check a dataset before training and say how to fix each problem.

  python dataset_utils/check_dataset.py my_data --class-list "1 2 3 4 5" --add-dirs nir

Checks every split (train/, val/, test/, or a single folder with images/): pairing of images, masks and band files,
readable files, sizes, channel counts and pixel types, mask values against the class list (0/255 against 0/1,
JPEG-like in-between values, palette PNGs), duplicate images (and the same image in two splits), empty masks.
Prints a report and exits 1 when there are errors (with --strict, warnings too). train.py runs the same data checks
before training; this tool adds the slower ones and a summary.
"""
import argparse
import hashlib
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checks import dataset_problems, label_problems, scan_samples
from cli import Parser, at_least
from dataset import band_folders, check_band_names, pair_files, split_folders
from errors import UserError, run_cli
from fileio import is_palette_png
from labels import Labels
from runtime import cpu_count


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("root", help="dataset root (with train/, val/, ...) or one split folder (with images/)")
    p.add_argument("--class-list", default=None, help='mask values that are classes, as for train.py (default "255")')
    p.add_argument("--max-mask-val", type=at_least(1), default=None, help="classes are mask values 1..N")
    p.add_argument("--ignore-label", type=at_least(0), default=None, help="mask value that is ignored")
    p.add_argument("--add-dirs", default=None,
                   help='extra band folders to check, e.g. "nir" (default: every folder beside images/ and gt/)')
    p.add_argument("--other-values", choices=["error", "background"], default="error",
                   help="mask values outside the class list: an error (default), or background as train.py treats "
                        "them with an explicit --class-list (they are then only reported)")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")
    p.add_argument("-w", "--workers", type=at_least(1), default=None, help="reading threads (default: CPU count)")
    return p


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class Report:
    """Errors and warnings gathered over the splits, with what later checks compare across splits."""

    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.layouts: dict[str, Counter] = {}  # split -> (channels, pixel types) counts
        self.digests: dict[str, list] = defaultdict(list)  # image file digest -> [(split, path)]


def check_split(split_dir: Path, bands: list[str], labels: Labels, workers: int, report: Report) -> None:
    """Read one split, print its summary, add its problems to the report."""
    name = split_dir.name
    try:
        samples, unpaired = pair_files(split_dir, bands, masks="required")
    except UserError as e:
        report.errors.append(str(e))
        return
    report.errors += [f"{line}; add the missing partner or remove the file" for line in unpaired]
    infos = scan_samples(samples, with_stats=False, workers=workers, desc=f"reading {name}")
    ok = [i for i in infos if not i.error]
    report.errors += dataset_problems(infos, None, name) + label_problems(
        ok, labels, name, "; or pass --other-values background to train them as background")
    values = Counter()
    for i in ok:
        values.update(i.mask_values)
    report.warnings += mask_warnings(name, samples, ok, values, labels)
    readable = [s for s, i in zip(samples, infos, strict=True) if not i.error]
    with ThreadPoolExecutor(workers) as pool:
        for sample, digest in zip(readable, pool.map(file_digest, [s.image for s in readable]), strict=True):
            report.digests[digest].append((name, sample.image))
    report.layouts[name] = Counter((i.channels, i.types) for i in ok)
    sizes, total = Counter((i.width, i.height) for i in ok), sum(values.values()) or 1
    channels = ", ".join(f"{c} channels {d} ({n})" for (c, d), n in report.layouts[name].items())
    print(f"\n{name}: {len(samples)} samples of {' + '.join(['images', 'gt', *bands])}; {channels}")
    print("  sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(6))
          + (f" and {len(sizes) - 6} more" if len(sizes) > 6 else ""))
    print("  mask values: " + ", ".join(f"{v} {100 * c / total:.1f}%" for v, c in sorted(values.items())[:12])
          + (" ..." if len(values) > 12 else ""))
    palette = [s.mask for s in readable if s.mask.suffix.lower() == ".png" and is_palette_png(s.mask)]
    empty = [i for i in ok if not any(v in i.mask_values for v in labels.values)]
    note = f"; {len(palette)} palette PNG mask(s): their palette indices are the label values" if palette else ""
    print(f"  masks without any class pixel: {len(empty)} of {len(ok)}{note}")
    if ok and len(empty) == len(ok) and name != "train":
        report.warnings.append(f"{name}: no mask holds a class value ({labels.flag}); metrics on it will be empty")


def mask_warnings(name: str, samples: list, ok: list, values: Counter, labels: Labels) -> list[str]:
    """Values trained as background, and JPEG masks."""
    warnings = []
    unlisted = sorted(set(values) - labels.known())
    if unlisted and not labels.strict:
        files = [i.mask for i in ok if set(i.mask_values) & set(unlisted)]
        warnings.append(f"{name}: mask values {', '.join(map(str, unlisted[:10]))} are not in {labels.flag}: "
                        f"trained as background ({len(files)} file(s), e.g. {', '.join(files[:3])})")
    jpeg = [s.mask for s in samples if s.mask.suffix.lower() in (".jpg", ".jpeg")]
    if jpeg:
        warnings.append(f"{name}: {len(jpeg)} mask(s) are JPEG, whose compression invents in-between label values "
                        f"(e.g. {jpeg[0]}); save masks as PNG or TIFF")
    return warnings


def compare_splits(report: Report) -> None:
    """Splits with different layouts, and the same image in two splits (leakage) or twice in one."""
    common = Counter()
    for layout in report.layouts.values():
        common.update(layout)
    if len(common) > 1:
        report.errors.append("splits differ in channels / pixel type: " + "; ".join(
            f"{n}: {', '.join(f'{c} channels {d}' for c, d in layout)}" for n, layout in report.layouts.items())
            + "; every split must have the training layout")
    for copies in report.digests.values():
        if len(copies) > 1:
            where = {n for n, _ in copies}
            names = ", ".join(str(p) for _, p in copies[:4])
            if len(where) > 1:
                report.errors.append(f"the same image is in {' and '.join(sorted(where))}: {names}; it leaks into "
                                     "validation and inflates its scores: keep it in one split")
            else:
                report.warnings.append(f"duplicate images in {copies[0][0]}: {names}")


def check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Print the report; return (errors, warnings)."""
    labels = Labels.from_args(args.class_list, args.max_mask_val, args.ignore_label)
    if args.add_dirs is not None:
        check_band_names(args.add_dirs.split())
    labels.strict = args.other_values == "error"  # stricter than train.py: stray values are often labelling slips
    workers = args.workers if args.workers is not None else min(8, cpu_count())
    report = Report()
    print(f"dataset: {Path(args.root)}  ({labels.flag}" + (f", ignore {labels.ignore}" if labels.ignore is not None
                                                           else "") + ")")
    for split_dir in split_folders(Path(args.root)):
        bands = args.add_dirs.split() if args.add_dirs is not None else band_folders(split_dir)
        check_split(split_dir, bands, labels, workers, report)
    compare_splits(report)
    return report.errors, report.warnings


def main() -> int:
    args = get_args_parser().parse_args()
    errors, warnings = check(args)
    for title, lines in (("ERRORS", errors), ("WARNINGS", warnings)):
        if lines:
            print(f"\n{title} ({len(lines)}):")
            for line in lines:
                print("  - " + line.replace("\n", "\n    "))
    failed = bool(errors) or (args.strict and bool(warnings))
    print(f"\nresult: {len(errors)} error(s), {len(warnings)} warning(s): "
          + ("fix them before training" if failed else "ready to train"))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
