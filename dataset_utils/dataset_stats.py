"""Statistics of a dataset: per-channel mean/std/min/max and percentiles, image sizes, class pixel frequencies and
suggested class weights.

  python dataset_utils/dataset_stats.py my_data --add-dirs nir --class-list "1 2 5" -o stats.json

Exact for integer images (histograms of every value), percentiles of float images from every 16th pixel.
Channels are the image's, then the --add-dirs bands, as train.py stacks them.
"""
import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from checks import nonfinite_problem
from cli import Parser, at_least, progress
from dataset import band_folders, check_band_names, pair_files, read_sample, split_folders
from errors import UserError, run_cli
from fileio import output_file, write_text
from labels import IGNORE_INDEX, Labels
from runtime import cpu_count

PERCENTILES = (1, 2, 50, 98, 99)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("root", help="dataset root (train/, val/, ...) or one folder with images/ and gt/")
    p.add_argument("--add-dirs", default=None, help='extra band folders (default: every folder beside images/)')
    p.add_argument("--class-list", default=None, help='mask values that are classes (default "255")')
    p.add_argument("--max-mask-val", type=at_least(1), default=None, help="classes are mask values 1..N")
    p.add_argument("--ignore-label", type=at_least(0), default=None, help="mask value that counts in no class")
    p.add_argument("-o", "--output", help="write the statistics as JSON here")
    return p


class Accumulator:
    """Streaming per-channel sums (float64), min/max, value histograms (integers) or a pixel sample (floats)."""

    def __init__(self):
        self.n = 0
        self.sums = self.sumsq = self.mins = self.maxs = None
        self.hist: list[np.ndarray] = []
        self.sample: list[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        flat = image.reshape(-1, image.shape[2])
        f64 = flat.astype(np.float64)
        if self.sums is None:
            c = flat.shape[1]
            self.sums, self.sumsq = np.zeros(c), np.zeros(c)
            self.mins, self.maxs = np.full(c, np.inf), np.full(c, -np.inf)
            self.hist = [np.zeros(0, np.int64) for _ in range(c)]
        self.n += len(flat)
        self.sums += f64.sum(0)
        self.sumsq += (f64 * f64).sum(0)
        self.mins, self.maxs = np.minimum(self.mins, f64.min(0)), np.maximum(self.maxs, f64.max(0))
        if flat.dtype.kind in "u":
            for c in range(flat.shape[1]):
                h = np.bincount(flat[:, c])
                if len(h) > len(self.hist[c]):
                    h[: len(self.hist[c])] += self.hist[c]
                    self.hist[c] = h
                else:
                    self.hist[c][: len(h)] += h
        else:
            self.sample.append(flat[::16].astype(np.float64))

    def result(self) -> dict:
        mean = self.sums / self.n
        std = np.sqrt(np.maximum(self.sumsq / self.n - mean * mean, 0))
        if self.sample:
            pct = np.percentile(np.concatenate(self.sample), PERCENTILES, axis=0).T
        else:
            pct = [[int(np.searchsorted(np.cumsum(h), q / 100 * h.sum())) for q in PERCENTILES] for h in self.hist]
        return {"mean": mean.tolist(), "std": std.tolist(), "min": self.mins.tolist(), "max": self.maxs.tolist(),
                "percentiles": {str(q): [float(p[i]) for p in pct] for i, q in enumerate(PERCENTILES)}}


def stats(args: argparse.Namespace) -> dict:
    labels = Labels.from_args(args.class_list, args.max_mask_val, args.ignore_label)
    lut = labels.lut()
    if args.add_dirs is not None:
        check_band_names(args.add_dirs.split())
    if args.output:
        output_file(Path(args.output), "-o")
    report = {}
    for split_dir in split_folders(Path(args.root)):
        bands = args.add_dirs.split() if args.add_dirs is not None else band_folders(split_dir)
        samples, unpaired = pair_files(split_dir, bands, masks="optional")
        if unpaired:
            raise UserError(f"{len(unpaired)} unpaired file(s) in {split_dir}, e.g. {unpaired[0]}; fix them first")
        acc, sizes, dtypes = Accumulator(), Counter(), Counter()
        pixels = np.zeros(labels.num_classes, np.int64)
        with ThreadPoolExecutor(cpu_count()) as pool:
            read = zip(samples, pool.map(lambda s: read_sample(s, lut), samples), strict=True)
            for sample, (image, mask) in progress(read, total=len(samples), desc=f"reading {split_dir.name}",
                                                  leave=False):
                problem = nonfinite_problem(image, sample.image)
                if problem:
                    raise UserError(problem)
                image = image if image.ndim == 3 else image[..., None]
                if acc.sums is not None and image.shape[2] != len(acc.sums):
                    raise UserError(f"{split_dir}: images have different channel counts; run check_dataset.py")
                acc.add(image)
                sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
                dtypes[str(image.dtype)] += 1
                if mask is not None:
                    counts = np.bincount(mask.ravel(), minlength=IGNORE_INDEX + 1)
                    pixels += counts[: labels.num_classes]
        freq = pixels / max(pixels.sum(), 1)
        present = freq[freq > 0]
        weights = np.clip(np.median(present) / np.maximum(freq, 1e-12), 0.1, 10) if len(present) else freq
        report[split_dir.name] = {
            "samples": len(samples), "channels": ["image"] * (len(acc.sums) - len(bands)) + bands,
            "dtypes": dict(dtypes), "sizes": dict(sizes.most_common()), **acc.result(),
            "classes": labels.names, "class_pixels": pixels.tolist(), "class_frequency": freq.tolist(),
            "suggested_class_weights": [round(float(w), 4) for w in weights],
            "suggested_pos_weight": round(float(min(10.0, pixels[0] / max(pixels[1:].sum(), 1))), 4),
        }
        print_split(split_dir.name, report[split_dir.name])
    if args.output:
        write_text(Path(args.output), json.dumps(report, indent=1))
        print(f"\nwrote {args.output}")
    return report


def print_split(name: str, r: dict) -> None:
    print(f"\n{name}: {r['samples']} samples, {', '.join(f'{d} ({n})' for d, n in r['dtypes'].items())}; sizes "
          + ", ".join(f"{s} ({n})" for s, n in list(r["sizes"].items())[:5]))
    print(f"  {'channel':<8} {'mean':>10} {'std':>10} {'min':>9} {'p1':>9} {'p50':>9} {'p99':>9} {'max':>9}")
    for c in range(len(r["mean"])):
        label = r["channels"][c] if r["channels"][c] != "image" else f"image[{c}]"
        p = r["percentiles"]
        print(f"  {label:<8} {r['mean'][c]:>10.2f} {r['std'][c]:>10.2f} {r['min'][c]:>9.4g} {p['1'][c]:>9.4g} "
              f"{p['50'][c]:>9.4g} {p['99'][c]:>9.4g} {r['max'][c]:>9.4g}")
    print("  classes: " + ", ".join(f"{n} {100 * f:.2f}%" for n, f in zip(r["classes"], r["class_frequency"],
                                                                           strict=True)))
    print(f"  suggested --class-weights \"{' '.join(map(str, r['suggested_class_weights']))}\" (ce), "
          f"--pos-weight {r['suggested_pos_weight']} (bce)")


def main() -> int:
    stats(get_args_parser().parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)
