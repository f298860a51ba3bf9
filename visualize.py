"""Pictures for people: any image as 8-bit RGB, class masks in colour, error maps, side-by-side panels, and a run's
training curves.

  python -m visualize curves logs/my_exp              # writes logs/my_exp/curves.png from its metrics.csv
  python -m visualize curves logs/my_exp -o run.png
  python -m visualize compare logs/a logs/b logs/c    # their val mIoU against minutes: compare.png, and a table
"""
import argparse
import csv
import itertools
import math
from pathlib import Path

import cv2
import numpy as np

from cli import Parser
from errors import UserError, note, run_cli

IGNORE_COLOR = (96, 96, 96)
FALSE_POSITIVE = (255, 64, 64)   # predicted, not in truth: red
FALSE_NEGATIVE = (64, 160, 255)  # in truth, missed: blue
TRUE_POSITIVE = (255, 255, 255)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """An (H, W[, C]) image of any dtype as (H, W, 3) uint8: first three channels (or grey), 8-bit data as is,
    anything else stretched per channel between its 2nd and 98th percentiles."""
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    flat = image.reshape(-1, 3).astype(np.float32)
    finite = flat[np.isfinite(flat).all(1)]
    lo, hi = (np.percentile(finite, [2, 98], axis=0) if len(finite) else (np.zeros(3), np.ones(3)))
    out = (image.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(np.nan_to_num(out), 0, 1) * 255).astype(np.uint8)


def class_colors(num_classes: int) -> np.ndarray:
    """Background black, binary foreground yellow (visible on dark and bright imagery), more classes in hues."""
    colors = np.zeros((256, 3), np.uint8)
    if num_classes == 2:
        colors[1] = (255, 220, 0)
    else:
        for c in range(1, num_classes):
            hue = int(180 * (c - 1) / max(num_classes - 1, 1))
            colors[c] = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0]
    colors[255] = IGNORE_COLOR
    return colors


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return class_colors(num_classes)[mask]


def overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """Classes painted over the picture; background left untouched."""
    colored = colorize(mask, num_classes).astype(np.float32)
    out = rgb.astype(np.float32)
    paint = (mask > 0)[..., None]
    return np.where(paint, (1 - alpha) * out + alpha * colored, out).astype(np.uint8)


def error_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per pixel: foreground found white, background right black, false positive (predicted foreground, truth
    other) red, false negative (foreground missed) blue, ignored grey."""
    out = np.zeros((*truth.shape, 3), np.uint8)
    valid = truth != 255
    out[valid & (pred == truth) & (truth > 0)] = TRUE_POSITIVE
    out[valid & (pred != truth) & (pred > 0)] = FALSE_POSITIVE
    out[valid & (pred != truth) & (pred == 0)] = FALSE_NEGATIVE
    out[~valid] = IGNORE_COLOR
    return out


def panel(tiles: list[np.ndarray], titles: list[str] | None = None, gap: int = 4) -> np.ndarray:
    """Pictures side by side (same height), with optional captions above each."""
    h = max(t.shape[0] for t in tiles)
    scale = max(0.4, min(t.shape[1] for t in tiles) / 700)  # captions readable on large pictures too
    bar = int(18 * scale / 0.4) if titles else 0
    cols = []
    for i, t in enumerate(tiles):
        canvas = np.full((h + bar, t.shape[1], 3), 255, np.uint8)
        canvas[bar:bar + t.shape[0]] = t
        if titles:
            cv2.putText(canvas, titles[i], (2, int(bar * 0.72)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                        max(1, int(scale * 2)), cv2.LINE_AA)
        cols.append(canvas)
        cols.append(np.full((h + bar, gap, 3), 255, np.uint8))
    return np.concatenate(cols[:-1], axis=1)


def stack_rows(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        out.append(np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(out, axis=0)[:-gap]


def confusion_png(cm: np.ndarray, names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix (truth rows, prediction columns) as a picture."""
    n, cell, margin = len(names), 56, 70
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)

    def text(s: str, x: int, y: int, color=(0, 0, 0)) -> None:
        cv2.putText(img, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)

    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            y, x = margin + i * cell, margin + j * cell
            img[y:y + cell - 2, x:x + cell - 2] = (shade, shade, 255)
            text(f"{rows[i, j]:.2f}", x + 6, y + cell // 2 + 4, (0, 0, 0) if rows[i, j] < 0.6 else (255, 255, 255))
        text(names[i][:7], 4, margin + i * cell + cell // 2 + 4)
        text(names[i][:7], margin + i * cell + 4, margin - 10)
    text("truth \\ pred", 4, 20)
    return img


# ------------------------------------------------------------------------------------------------------ curves
def read_metrics(exp_dir: Path) -> list[dict[str, float]]:
    """metrics.csv of an experiment folder as numbers (empty cells, epochs that skipped a val set, as NaN)."""
    path = exp_dir / "metrics.csv"
    if not path.is_file():
        hint = "it is a file; give its experiment folder" if exp_dir.is_file() else "give a folder train.py wrote"
        raise UserError(f"{exp_dir}: no metrics.csv there ({hint}, e.g. logs/my_exp)")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        lines = list(csv.reader(f))
    header, rows = (lines[0], lines[1:]) if lines else ([], [])
    numbers = []
    for i, row in enumerate(rows):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} of {len(header)} fields")
            numbers.append({k: float(v) if v else math.nan for k, v in zip(header, row, strict=True)})
        except ValueError as e:
            if i < len(rows) - 1:
                raise UserError(f"{path}: line {i + 2} is damaged ({e}); restore the file or train again") from None
            note(f"{path}: its last line is incomplete (a run still writing it, or a copy cut short); left out")
    if not numbers or "epoch" not in header:
        raise UserError(f"{path}: no epoch finished yet; train for at least one epoch")
    return numbers


def plot_curves(rows: list[dict[str, float]], title: str, path: Path) -> None:
    """Loss (train and val) and mIoU (every val set, each class's IoU faint) per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, iou_ax) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if key in rows[0]:
            loss_ax.plot(epochs, [r[key] for r in rows], marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    for key in [k for k in rows[0] if k.startswith("iou_")]:
        iou_ax.plot(epochs, [r[key] for r in rows], lw=0.8, alpha=0.45, label=f"IoU class {key[4:]}")
    for key in [k for k in rows[0] if k.endswith("_miou")]:
        iou_ax.plot(epochs, [r[key] for r in rows], marker=".", lw=2, label=key.replace("_miou", " mIoU"))
    scored = [r for r in rows if not math.isnan(r.get("score", math.nan))]
    if scored:
        best = max(scored, key=lambda r: r["score"])
        iou_ax.plot([best["epoch"]], [best["score"]], "k*", ms=12,
                    label=f"best {best['score']:.3f} at epoch {best['epoch']:g}")
    iou_ax.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    for ax in (loss_ax, iou_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(exp_dirs: list[Path], out: Path) -> str:
    """Validation mIoU of several runs against wall time on one figure; returns a table of their best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    lines = [f"{'experiment':<24} {'best mIoU':>9} {'epoch':>5} {'minute':>6}  {'model':<18} {'crop':>4} "
             f"{'batch':>5} {'budget':>6}"]
    for exp in exp_dirs:
        rows = [r for r in read_metrics(exp) if not math.isnan(r.get("val_miou", math.nan))]
        if not rows:
            raise UserError(f"{exp}/metrics.csv: no validated epoch yet")
        minutes = [m / 60 for m in itertools.accumulate(r.get("time_s", 0.0) for r in rows)]
        ax.plot(minutes, [r["val_miou"] for r in rows], marker=".", label=exp.name)
        k = max(range(len(rows)), key=lambda i: rows[i]["val_miou"])
        settings = read_args(exp)
        budget = f"{settings['budget'] / 60:.0f}m" if settings.get("budget") else "-"
        lines.append(f"{exp.name[:24]:<24} {rows[k]['val_miou']:>9.4f} {rows[k]['epoch']:>5.0f} {minutes[k]:>6.1f}  "
                     f"{str(settings.get('model', '?')) + '/' + str(settings.get('encoder', '?')):<18.18} "
                     f"{settings.get('image_size') or '-'!s:>4} {settings.get('batch_size', '-')!s:>5} {budget:>6}")
    ax.set(xlabel="minutes of training (validation included)", ylabel="val mIoU", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return "\n".join(lines)


def read_args(exp_dir: Path) -> dict:
    """The settings a run trained with (args.json), {} where it has none (runs of older versions)."""
    from fileio import read_json

    path = Path(exp_dir) / "args.json"
    return read_json(path, "it is rewritten when the run resumes") if path.is_file() else {}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="loss and mIoU per epoch of a training run, from its metrics.csv")
    c.add_argument("exp_dir", type=Path, help="experiment folder written by train.py (holds metrics.csv)")
    c.add_argument("-o", "--output", type=Path, help="the picture (default: EXP_DIR/curves.png)")
    c = sub.add_parser("compare", help="several runs' val mIoU against wall time on one figure, and their best")
    c.add_argument("exp_dirs", type=Path, nargs="+", help="experiment folders written by train.py")
    c.add_argument("-o", "--output", type=Path, default=Path("compare.png"), help="the picture (compare.png)")
    return p


def main(args: argparse.Namespace) -> int:
    out = args.output or args.exp_dir / "curves.png"
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise UserError(f"-o {out}: name a .png, .jpg, .pdf or .svg file")
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: folder {out.parent} does not exist; create it first")
    if args.command == "compare":
        print(compare(args.exp_dirs, out))
    else:
        rows = read_metrics(args.exp_dir)
        plot_curves(rows, f"{args.exp_dir.resolve().name}: {len(rows)} epochs", out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
