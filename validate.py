"""Evaluate a trained model on a folder and write masks, probabilities, plots and metrics.

  python validate.py -cd logs/my_exp -d my_data/val --binary --plots
  python validate.py -c logs/my_exp/best.pth -d new_scenes --binary --tta d4     # no gt/: predictions only
  python validate.py -cd logs/my_exp -d my_data/val --find-threshold --save-threshold

The folder holds images/, optionally gt/ (then metrics are computed) and the extra band folders the model was
trained with. Everything about preprocessing (bands, normalisation, label values, resize mode, architecture) comes
from the checkpoint. Images up to the tile size are predicted whole, in batches of equal shapes; larger ones with a
sliding window of overlapping tiles; every mask comes back at exactly its image's size.
"""
import argparse
import contextlib
import csv
import heapq
import io
import itertools
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import metrics
import visualize
from dataset import (
    IGNORE_INDEX,
    ChannelStats,
    Labels,
    SegmentationDataset,
    as_is,
    find_samples,
    folder_label,
    read_sample,
)
from errors import UserError, run_cli
from fileio import write_image, write_text
from inference import TTA_MODES, predict
from model import load_checkpoint, min_input_size, model_from_checkpoint, save_checkpoint
from runtime import AMP_CHOICES, amp_dtype, configure, default_workers, select_device, worker_init

MARKER = ".segkit-validate"  # marks an output folder as ours, so a re-run may clear its old files
SWEEP_BINS = 1000


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("-c", "--check-path", help="checkpoint file (best.pth or last.pth written by train.py)")
    g.add_argument("-cd", "--check-dir", help="experiment folder: uses its best.pth")
    g.add_argument("-d", "--dataset-dir", required=True,
                   help="folder with images/, optional gt/, and the extra band folders the model was trained with")
    g = p.add_argument_group("prediction")
    g.add_argument("-t", "--thres", type=float, default=None,
                   help="binary threshold on the foreground probability (default: the checkpoint's, else 0.5)")
    g.add_argument("--tile-size", type=int, default=None,
                   help="images up to this size are predicted whole; larger ones in overlapping tiles of it "
                        "(default: the training run's --val-tile-size, so metrics match training's validation)")
    g.add_argument("--overlap", type=float, default=0.5, help="overlap between tiles, a fraction (0.5)")
    g.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation: flips, or all 8 D4 ops")
    g.add_argument("-b", "--batch", type=int, default=8, help="images or tiles per forward pass (8)")
    g.add_argument("-w", "--workers", type=int, default=None, help="data-loading processes (default: from the CPU)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="device: 0, cuda:1, mps, cpu")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision (auto: bf16/fp16 on GPU)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output-dir", default=None,
                   help="where outputs go (default: a folder next to the checkpoint named after the dataset)")
    g.add_argument("--binary", action="store_true",
                   help="write one mask per image in the dataset's own label values (usable as gt/ again)")
    g.add_argument("--raw", action="store_true", help="write probabilities (binary: foreground; multi-class: max)")
    g.add_argument("--raw-format", default="png", choices=["png", "tif"],
                   help="png: 8-bit 0-255; tif: float32 (multi-class: one band per class)")
    g.add_argument("--plots", action="store_true",
                   help="one picture per image (image, truth, prediction, errors) and worst.png")
    g.add_argument("--worst", type=int, default=8, help="images in worst.png (8)")
    g.add_argument("--com", "--calc-only-metrics", dest="com", action="store_true",
                   help="metrics only: no masks, probabilities or plots")
    g.add_argument("--vis", action="store_true", help="show the first plot when a display is available")
    g = p.add_argument_group("threshold")
    g.add_argument("--find-threshold", action="store_true",
                   help="sweep thresholds on this set (binary models) and print IoU for each")
    g.add_argument("--save-threshold", action="store_true",
                   help="with --find-threshold: store the best threshold in the checkpoint for later runs")
    return p


# ----------------------------------------------------------------------------------------------------- input
class ValidationSet(SegmentationDataset):
    """Samples checked against the checkpoint: (image, mask or None, index, thumbnail for plots, error or None).

    Problems come back as values, not exceptions, so a worker process never prints a traceback.
    """

    def __init__(self, samples, labels: Labels, stats, in_channels: int, band_names: list[str], thumbnails: bool):
        super().__init__(samples, labels, stats)
        self.labels, self.in_channels, self.band_names = labels, in_channels, band_names
        self.thumbnails = thumbnails

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        sample = self.samples[index]
        image, mask = read_sample(sample, None)
        if image.shape[2] != self.in_channels:
            bands = f" + {len(self.band_names)} extra band(s) ({', '.join(self.band_names)})" if self.band_names else ""
            raise UserError(f"{sample.image}: {image.shape[2] - len(self.band_names)} image channel(s){bands} = "
                            f"{image.shape[2]} channels, but the model was trained on {self.in_channels}")
        if mask is not None:
            values = set(np.unique(mask).tolist())
            unknown = sorted(values - self.labels.known())
            if unknown and self.labels.strict:
                raise UserError(f"{sample.mask}: mask values {', '.join(map(str, unknown[:8]))} are unknown to the "
                                f"model, which was trained with {self.labels.flag}; fix the masks or validate "
                                "without gt/")
            mask = self.lut[mask]
        return image, mask

    def __getitem__(self, index: int):
        try:
            image, mask = self.load(index)
        except UserError as e:
            return None, None, index, None, str(e)
        thumb = visualize.to_rgb8(image) if self.thumbnails else None
        x = image.reshape(*image.shape[:2], -1).astype(np.float32) * self.scale_raw + self.shift_raw
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return x, (torch.from_numpy(mask) if mask is not None else None), index, thumb, None


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    if bool(args.check_path) == bool(args.check_dir):
        raise UserError("give the model as -c CHECKPOINT or -cd EXPERIMENT_DIR (one of them)")
    if args.check_path:
        return Path(args.check_path)
    folder = Path(args.check_dir)
    if not folder.is_dir():
        raise UserError(f"-cd {folder}: experiment folder not found")
    for name in ("best.pth", "last.pth"):
        if (folder / name).exists():
            return folder / name
    raise UserError(f"-cd {folder}: no best.pth or last.pth in it; is it a segkit experiment folder?")


def prepare_output(args: argparse.Namespace, ckpt_path: Path, data_dir: Path) -> Path:
    """The output folder, created and proven writable; our own old outputs in it are cleared."""
    if args.output_dir:
        out = Path(args.output_dir)
    else:
        out = ckpt_path.parent / f"predictions_{folder_label(data_dir) or 'dataset'}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (out / MARKER).exists():
            for sub in ("masks", "raw", "plots"):
                for f in (out / sub).glob("*") if (out / sub).is_dir() else []:
                    f.unlink()
        (out / MARKER).write_text("outputs of segkit validate.py; a re-run clears masks/, raw/ and plots/\n")
    except OSError as e:
        raise UserError(f"-o {out}: cannot write there ({e.strerror}); choose another --output-dir") from None
    return out


# ---------------------------------------------------------------------------------------------------- output
def label_values(labels: Labels) -> np.ndarray:
    """Class index -> the dataset's label value (background 0)."""
    values = np.array([0, *labels.values])
    return values.astype(np.uint8 if values.max() <= 255 else np.uint16)


def write_outputs(args, out: Path, stem: str, probs: torch.Tensor, pred: np.ndarray, values: np.ndarray) -> None:
    if args.binary:
        write_image(out / "masks" / f"{stem}.png", values[pred])
    if args.raw:
        p = probs.float().cpu().numpy()
        if args.raw_format == "tif":
            write_image(out / "raw" / f"{stem}.tif", p[0] if p.shape[0] == 1 else np.ascontiguousarray(
                p.transpose(1, 2, 0)))
        else:
            top = p[0] if p.shape[0] == 1 else p.max(0)
            write_image(out / "raw" / f"{stem}.png", np.round(top * 255).astype(np.uint8))


def plot_panel(thumb: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, num_classes: int, title: str
               ) -> np.ndarray:
    tiles = [thumb]
    names = [title[:28]]
    if truth is not None:
        tiles += [visualize.overlay(thumb, truth, num_classes), visualize.overlay(thumb, pred, num_classes),
                  visualize.error_map(truth, pred)]
        names += ["truth", "prediction", "errors: FP red, FN blue"]
    else:
        tiles.append(visualize.overlay(thumb, pred, num_classes))
        names.append("prediction")
    return visualize.panel(tiles, names)


def confusion_png(cm: np.ndarray, names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix (truth rows, prediction columns) as a picture."""
    n, cell, margin = len(names), 56, 70
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)
    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            y, x = margin + i * cell, margin + j * cell
            img[y:y + cell - 2, x:x + cell - 2] = (shade, shade, 255)
            color = (0, 0, 0) if rows[i, j] < 0.6 else (255, 255, 255)
            cv2.putText(img, f"{rows[i, j]:.2f}", (x + 6, y + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1,
                        cv2.LINE_AA)
        cv2.putText(img, names[i][:7], (4, margin + i * cell + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, names[i][:7], (margin + i * cell + 4, margin - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "truth \\ pred", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def clean(value):
    """JSON has no NaN: absent classes become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


def show(picture: Path) -> None:
    """Show a picture where a display exists (a notebook or a desktop); otherwise say where it is."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display

        if get_ipython() is not None:
            display(Image(filename=str(picture)))
            return
    except ImportError:
        pass
    try:
        import matplotlib.pyplot as plt

        if plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
            plt.imshow(cv2.imdecode(np.fromfile(picture, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
            plt.axis("off")
            plt.show()
            return
    except ImportError:
        pass
    print(f"note: no display here (--vis); open {picture}")


# ----------------------------------------------------------------------------------------------- the loop
def predict_folder(model: torch.nn.Module, loader: DataLoader, infer: dict, batch_size: int, device: torch.device,
                   on_batch) -> None:
    """Predict every item of a ValidationSet loader; hand each batch's (logits, masks, indices, thumbnails) on.

    Consecutive images of one shape that fits in a tile are stacked into batches and run whole; larger images go
    alone through predict(), which slides the tile over them. Images over 16 Mpx are blended in host memory.
    """
    tile, pending = infer["tile_size"], []

    def flush() -> None:
        if pending:
            images, masks, indices, thumbs = zip(*pending, strict=True)
            on_batch(predict(model, torch.stack(images).to(device, non_blocking=True), **infer), masks, indices,
                     thumbs)
            pending.clear()

    for image, mask, index, thumb, error in loader:
        if error:
            raise UserError(error)
        h, w = image.shape[-2:]
        if (h <= tile and w <= tile) or infer["resize_to"]:
            if pending and pending[0][0].shape != image.shape:
                flush()
            pending.append((image, mask, index, thumb))
            if len(pending) == batch_size:
                flush()
        else:
            flush()
            big = image.shape[-1] * image.shape[-2] > 4096 * 4096
            on_batch(predict(model, image[None] if big else image[None].to(device, non_blocking=True), **infer),
                     [mask], [index], [thumb])
    flush()


class Evaluation:
    """What happens to each predicted batch: metrics accumulated on the device for the whole batch at once, then
    the files asked for, image by image."""

    def __init__(self, labels: Labels, threshold: float, samples: list, device: torch.device,
                 args: argparse.Namespace | None = None, out: Path | None = None):
        self.binary, self.threshold, self.samples, self.device = labels.binary, threshold, samples, device
        self.args, self.out = args, out
        self.num_classes = labels.num_classes
        self.values = label_values(labels)
        self.cm = torch.zeros((self.num_classes,) * 2, dtype=torch.long, device=device)
        self.per_image: list[torch.Tensor] = []  # (N, C, C) per batch
        self.stems: list[str] = []
        self.sweep = torch.zeros((2, SWEEP_BINS), dtype=torch.long, device=device)  # background / foreground
        self.worst: list = []  # heap of (-iou, plot number, picture): the number breaks ties between equal IoUs
        self.plotted = itertools.count()
        self.first_plot = None
        self.pixels = 0

    def __call__(self, logits: torch.Tensor, masks: list, indices: list[int], thumbs: list) -> None:
        logits = logits.float().to(self.device)
        probs = torch.sigmoid(logits) if self.binary else torch.softmax(logits, 1)
        preds = (probs[:, 0] > self.threshold).long() if self.binary else probs.argmax(1)
        self.stems += [self.samples[i].stem for i in indices]
        self.pixels += preds.numel()
        image_cms = truth = None
        if masks[0] is not None:
            truth = torch.stack(masks).to(self.device, non_blocking=True)
            image_cms = metrics.per_image_confusion(preds, truth, self.num_classes)
            self.cm += image_cms.sum(0)
            self.per_image.append(image_cms)
            if self.args is not None and self.args.find_threshold:
                valid = truth != IGNORE_INDEX
                q = (probs[:, 0][valid] * SWEEP_BINS).long().clamp_(0, SWEEP_BINS - 1)
                self.sweep.view(-1).index_add_(0, truth[valid].long() * SWEEP_BINS + q, torch.ones_like(q))
        if self.out is None:
            return
        preds = preds.cpu().numpy().astype(np.uint8)
        ious = None if image_cms is None else metrics.mean_foreground_iou(image_cms).tolist()
        for k, index in enumerate(indices):
            self.write(self.samples[index].stem, probs[k], preds[k], None if truth is None else truth[k],
                       None if ious is None else ious[k], thumbs[k])

    def write(self, stem: str, probs: torch.Tensor, pred: np.ndarray, truth: torch.Tensor | None, iou: float | None,
              thumb) -> None:
        args, out = self.args, self.out
        write_outputs(args, out, stem, probs, pred, self.values)
        if args.plots:
            truth = None if truth is None else truth.cpu().numpy()
            panel = plot_panel(thumb, truth, pred, self.num_classes, stem + ("" if iou is None else f"  IoU {iou:.3f}"))
            path = out / "plots" / (f"{stem}_iou{iou:.4f}.png" if iou is not None else f"{stem}.png")
            write_image(path, panel)
            self.first_plot = self.first_plot or path
            if iou is not None:
                scale = min(1.0, 200 / panel.shape[0])
                heapq.heappush(self.worst, (-iou, next(self.plotted),
                                            cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)))
                if len(self.worst) > args.worst:
                    heapq.heappop(self.worst)


# ------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    ckpt_path = resolve_checkpoint(args)
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt["meta"]
    labels = Labels.from_meta(meta["labels"])
    names = meta["class_names"]
    if args.find_threshold and not labels.binary:
        raise UserError("--find-threshold is for binary models; this one has classes " + ", ".join(names))
    if args.save_threshold and not args.find_threshold:
        raise UserError("--save-threshold needs --find-threshold")
    threshold = args.thres if args.thres is not None else meta.get("threshold", 0.5)
    if not 0 < threshold < 1:
        raise UserError(f"-t {threshold} must be between 0 and 1")
    tile = args.tile_size or meta.get("val_tile_size", meta["image_size"])
    if tile % 32 or tile < min_input_size(meta["arch"]):
        raise UserError(f"--tile-size {tile} must be a multiple of 32 and at least {min_input_size(meta['arch'])}")
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap} must be at least 0 and below 1")
    data_dir = Path(args.dataset_dir)
    if not (data_dir / "images").is_dir() and (data_dir / "val" / "images").is_dir():
        raise UserError(f"{data_dir} has no images/ folder but {data_dir / 'val'} has one: pass -d {data_dir / 'val'}")
    samples = find_samples(data_dir, meta["add_dirs"], masks="optional")
    has_gt = samples[0].mask is not None
    if args.com and not has_gt:
        raise UserError(f"--com computes metrics only, but {data_dir} has no gt/ folder")
    if not has_gt:
        print(f"note: {data_dir} has no gt/ folder: predicting only, no metrics")
    out = prepare_output(args, ckpt_path, data_dir)
    for flag, sub in ((args.binary, "masks"), (args.raw, "raw"), (args.plots, "plots")):
        if flag and not args.com:
            (out / sub).mkdir(exist_ok=True)

    device = select_device(args.cpu, args.device)
    amp = amp_dtype(args.amp, device)
    configure(device)
    model = model_from_checkpoint(ckpt).to(device).eval()
    if device.type in ("cuda", "cpu"):  # channels-last convolutions: faster on both (bench/RESULTS.md)
        model.to(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()

    infer = {"tile_size": tile, "overlap": args.overlap, "tta": args.tta, "batch_size": args.batch,
             "autocast": autocast, "min_size": min_input_size(meta["arch"]),
             "resize_to": meta["image_size"] if meta["resize"] else None}
    dataset = ValidationSet(samples, labels, ChannelStats(**meta["stats"]), meta["in_channels"], meta["add_dirs"],
                            thumbnails=args.plots and not args.com)
    workers = args.workers if args.workers is not None else default_workers(device)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init, prefetch_factor=4 if workers else None, collate_fn=as_is)
    evaluation = Evaluation(labels, threshold, samples, device, args, None if args.com else out)
    t0 = time.monotonic()
    predict_folder(model, tqdm(loader, total=len(samples), desc="predicting", leave=False, dynamic_ncols=True),
                   infer, args.batch, device, evaluation)
    seconds = time.monotonic() - t0
    print(f"{len(samples)} images, {evaluation.pixels / 1e6:.1f} Mpx in {seconds:.1f}s ({len(samples) / seconds:.1f} "
          f"img/s, {evaluation.pixels / 1e6 / seconds:.2f} Mpx/s) on {device}; outputs in {out}")
    if has_gt:
        report(args, out, ckpt_path, data_dir, names, threshold, evaluation, tile)
        if args.find_threshold:
            best = threshold_sweep(evaluation.sweep.cpu().numpy(), threshold)
            if args.save_threshold:
                ckpt["meta"]["threshold"] = best
                save_checkpoint(ckpt_path, ckpt)
                print(f"saved threshold {best:.2f} in {ckpt_path}; later runs use it unless -t is given")
    if args.vis:
        if evaluation.first_plot:
            show(evaluation.first_plot)
        else:
            print("note: --vis shows the first plot; add --plots")
    return 0


def report(args, out: Path, ckpt_path: Path, data_dir: Path, names: list[str], threshold: float,
           evaluation: Evaluation, tile: int) -> None:
    s = metrics.summarize(evaluation.cm)
    keyed = {k: dict(zip(names, s[k], strict=True)) for k in ("per_class_iou", "f1", "precision", "recall")}
    result = {"miou": s["miou"], **keyed, "accuracy": s["accuracy"], "confusion_matrix": s["confusion_matrix"],
              "classes": names, "threshold": threshold if len(names) == 2 else None, "checkpoint": str(ckpt_path),
              "dataset": str(data_dir), "images": len(evaluation.stems), "tile_size": tile, "overlap": args.overlap,
              "tta": args.tta}
    write_text(out / "metrics.json", json.dumps(clean(result), indent=2) + "\n")
    pics = torch.cat(evaluation.per_image).cpu()
    ious = metrics.iou_per_class(pics).numpy()
    miou = metrics.mean_foreground_iou(pics).numpy()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", *[f"iou_{n}" for n in names], "miou", *[f"f1_{n}" for n in names[1:]]])
    for stem, row, m, image_cm in zip(evaluation.stems, ious, miou, pics.double(), strict=True):
        tp = image_cm.diagonal()
        f1 = (2 * tp / (image_cm.sum(0) + image_cm.sum(1))).tolist()[1:]
        w.writerow([stem, *[f"{v:.6f}" if not math.isnan(v) else "" for v in row], f"{m:.6f}",
                    *[f"{v:.6f}" if not math.isnan(v) else "" for v in f1]])
    write_text(out / "per_image.csv", buf.getvalue())
    if len(names) > 2 and not args.com:
        write_image(out / "confusion_matrix.png", confusion_png(np.asarray(s["confusion_matrix"]), names))
    if evaluation.worst and not args.com:
        panels = [p for _, _, p in sorted(evaluation.worst, key=lambda t: -t[0])]
        write_image(out / "worst.png", visualize.stack_rows(panels))
    print(f"{'class':>8} {'IoU':>7} {'F1':>7} {'prec':>7} {'recall':>7}")
    for i, n in enumerate(names):
        print(f"{n:>8} " + " ".join(f"{v:7.4f}" for v in (s["per_class_iou"][i], s["f1"][i], s["precision"][i],
                                                           s["recall"][i])))
    print(f"accuracy {s['accuracy']:.4f}" + (f", threshold {threshold:.2f}" if len(names) == 2 else ""))
    print(f"mIoU: {s['miou']:.4f}")


def threshold_sweep(hist: np.ndarray, current: float) -> float:
    """IoU of the foreground at every threshold, from per-bin pixel counts; prints a table, returns the best."""
    bg, fg = hist.astype(np.float64)
    above_bg, above_fg = np.cumsum(bg[::-1])[::-1], np.cumsum(fg[::-1])[::-1]  # pixels with probability >= bin

    def iou(t: float) -> float:
        k = min(SWEEP_BINS - 1, round(t * SWEEP_BINS))
        tp, fp = above_fg[k], above_bg[k]
        return tp / max(fg.sum() + fp, 1)

    print("threshold   IoU")
    for t in np.arange(0.05, 0.951, 0.05):
        print(f"   {t:.2f}   {iou(t):.4f}")
    grid = np.arange(0.01, 0.995, 0.01)
    best = float(grid[int(np.argmax([iou(t) for t in grid]))])
    print(f"best threshold {best:.2f}: IoU {iou(best):.4f} (at {current:.2f}: {iou(current):.4f})")
    return best


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
