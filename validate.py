"""Evaluate a trained model on a folder and write masks, probabilities, plots and metrics.

  python validate.py -cd logs/my_exp -d my_data/val --binary --plots
  python validate.py -c logs/my_exp/best.pth -d new_scenes --binary --tta d4     # no gt/: predictions only
  python validate.py -cd logs/my_exp -d my_data/val --find-threshold --save-threshold

The folder holds images/, optionally gt/ (then metrics are computed) and the extra band folders the model was
trained with. Everything about preprocessing (bands, normalisation, label values, resize mode, architecture) comes
from the checkpoint (or an exported bundle, given as -c). Every file is checked against the model before
prediction starts; images up to the tile size are predicted whole, in batches of equal sizes, larger ones with a
sliding window; every mask comes back at exactly its image's size.
"""
import argparse
import csv
import heapq
import io
import itertools
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cli import Parser, add_runtime_flags, at_least, progress
from errors import UserError, raise_problems, run_cli
from inference import add_prediction_flags

MARKER = ".segkit-validate"  # marks an output folder as ours, so a re-run may clear its old files
SWEEP_BINS = 1000
HOST_PIXELS = 4096 * 4096  # images larger than this are blended in host memory, not on the device


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("-d", "--dataset-dir", required=True,
                   help="folder with images/, optional gt/, and the extra band folders the model was trained with")
    g = p.add_argument_group("model")
    g.add_argument("-c", "--checkpoint", dest="check_path",
                   help="best.pth or last.pth written by train.py, or a bundle folder written by export.py")
    g.add_argument("-cd", "--check-dir", help="experiment folder: uses its best.pth")
    g.add_argument("-m", "--model", help="any of the above, as predict.py takes it: a checkpoint, an experiment "
                                         "folder or a bundle folder")
    g = p.add_argument_group("prediction")
    add_prediction_flags(g, "the training run's --val-tile-size, so metrics match training's validation", 8, "8")
    g.add_argument("--find-threshold", action="store_true",
                   help="sweep thresholds on this set (binary models) and print IoU for each")
    g.add_argument("--save-threshold", action="store_true",
                   help="with --find-threshold: store the best threshold in the checkpoint for later runs")
    g = p.add_argument_group("runtime")
    add_runtime_flags(g)
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
    g.add_argument("--worst", type=at_least(1), default=8, help="images in worst.png (8)")
    g.add_argument("--com", "--calc-only-metrics", dest="com", action="store_true",
                   help="metrics only: no masks, probabilities or plots")
    g.add_argument("--vis", action="store_true", help="show the first plot when a display is available")
    return p


# ----------------------------------------------------------------------------------------------------- input
def model_path(args: argparse.Namespace) -> Path:
    if sum(map(bool, (args.check_path, args.check_dir, args.model))) != 1:
        raise UserError("give the model once: -m (a checkpoint, experiment folder or bundle), -c CHECKPOINT or "
                        "-cd EXPERIMENT_DIR")
    if args.check_path:
        return Path(args.check_path)
    import checkpoint
    from bundle import bundle_folder

    if args.model:
        model = Path(args.model)
        if not model.exists():
            raise UserError(f"-m {model}: not found; give a best.pth, an experiment folder or an exported bundle")
        return bundle_folder(model) or checkpoint.find(model, "-m")
    folder = Path(args.check_dir)
    if folder.is_file():  # a checkpoint given where its folder was asked for: as -c takes it
        return folder
    if not folder.is_dir():
        raise UserError(f"-cd {folder}: experiment folder not found")
    return checkpoint.find(folder, "-cd")


def check_flags(args: argparse.Namespace, predictor, path: Path) -> None:
    if args.find_threshold and not predictor.meta.binary:
        raise UserError("--find-threshold is for binary models; this one has classes "
                        + ", ".join(predictor.meta.class_names))
    if args.save_threshold and not args.find_threshold:
        raise UserError("--save-threshold needs --find-threshold")
    if args.save_threshold and (path.suffix != ".pth" or not os.access(path, os.W_OK)
                                or not os.access(path.parent, os.W_OK)):
        raise UserError(f"--save-threshold rewrites {path}, which is not a checkpoint this run may write; drop "
                        "--save-threshold or make it writable")


def check_data(data_dir: Path, predictor, workers: int) -> tuple[list, list[tuple[int, int]]]:
    """The samples and their sizes, every file read once and checked against the model: all problems together."""
    from checks import dataset_problems, scan_samples, unlisted_note
    from dataset import find_samples
    from fileio import is_image_file

    if not (data_dir / "images").is_dir() and (data_dir / "val" / "images").is_dir():
        raise UserError(f"{data_dir} has no images/ folder but {data_dir / 'val'} has one: pass -d {data_dir / 'val'}")
    if not (data_dir / "images").is_dir() and data_dir.is_dir() and any(map(is_image_file, data_dir.iterdir())):
        raise UserError(f"-d {data_dir} holds images itself, not in an images/ folder: move them into "
                        f"{data_dir / 'images'} (their masks into gt/), or map them with python predict.py -m MODEL "
                        f"-i {data_dir} -o OUTPUT_DIR")
    meta = predictor.meta
    samples = find_samples(data_dir, meta.add_dirs, masks="optional")
    infos = scan_samples(samples, with_stats=False, workers=max(1, workers), desc="checking")
    labels = meta.labels if samples[0].mask is not None else None
    problems = dataset_problems(infos, labels, data_dir.name, trained=True)
    for (channels, dtype), group in itertools.groupby(sorted((i for i in infos if not i.error),
                                                             key=lambda i: (i.channels, i.dtype)),
                                                      key=lambda i: (i.channels, i.dtype)):
        group = list(group)
        low, high = min(i.mins.min() for i in group), max(i.maxs.max() for i in group)
        problem = predictor.input_problem(group[0].image + (f" (and {len(group) - 1} more)" if len(group) > 1
                                                            else ""), channels, dtype, low, high)
        problems += [problem] if problem else []
    raise_problems(problems, str(data_dir))
    note = unlisted_note(infos, meta.labels, data_dir.name) if labels else None
    if note:
        print(note)
    return samples, [(i.height, i.width) for i in infos]


def prepare_output(args: argparse.Namespace, ckpt_path: Path, data_dir: Path) -> Path:
    """The output folder, created and proven writable; our own old outputs in it are cleared, a folder of the
    user's with other files in it is refused."""
    from dataset import folder_label
    from fileio import output_folder

    base = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    out = Path(args.output_dir) if args.output_dir else base / f"predictions_{folder_label(data_dir) or 'dataset'}"
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"-o {out} already holds files that validate.py did not write; choose a new or empty folder")
    out = output_folder(out, "-o")
    for sub in ("masks", "raw", "plots"):
        for f in (out / sub).iterdir() if (out / sub).is_dir() else []:
            f.unlink()
    for name in ("metrics.json", "per_image.csv", "confusion_matrix.png", "worst.png"):
        (out / name).unlink(missing_ok=True)
    (out / MARKER).write_text("outputs of segkit validate.py; a re-run replaces them\n")
    for flag, sub in ((args.binary, "masks"), (args.raw, "raw"), (args.plots, "plots")):
        if flag and not args.com:
            (out / sub).mkdir(exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------- output
def write_outputs(args: argparse.Namespace, out: Path, image: Path, probs: np.ndarray, mask: np.ndarray) -> None:
    from fileio import write_image
    from scenes import write_mask

    stem = image.stem
    if args.binary:
        write_mask(out / "masks", image, mask)
    if args.raw:
        if args.raw_format == "tif":
            write_image(out / "raw" / f"{stem}.tif", probs[0] if probs.shape[0] == 1 else np.ascontiguousarray(
                probs.transpose(1, 2, 0)))
        else:
            top = probs[0] if probs.shape[0] == 1 else probs.max(0)
            write_image(out / "raw" / f"{stem}.png", np.round(top * 255).astype(np.uint8))


def plot_panel(thumb: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, num_classes: int, title: str
               ) -> np.ndarray:
    import visualize

    tiles, names = [thumb], [title[:28]]
    if truth is not None:
        tiles += [visualize.overlay(thumb, truth, num_classes), visualize.overlay(thumb, pred, num_classes),
                  visualize.error_map(truth, pred)]
        names += ["truth", "prediction", "white hit, red false+, blue missed"]
    else:
        tiles.append(visualize.overlay(thumb, pred, num_classes))
        names.append("prediction")
    return visualize.panel(tiles, names)


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

        from fileio import read_image

        if plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
            plt.imshow(read_image(picture))
            plt.axis("off")
            plt.show()
            return
    except ImportError:
        pass
    print(f"note: no display here (--vis); open {picture}")


# ------------------------------------------------------------------------------------------------ evaluation
class Evaluation:
    """What happens to each predicted batch: metrics accumulated on the device for the whole batch at once, then
    the files asked for, written by a few threads while the model works on the next batch."""

    def __init__(self, predictor, samples: list, args: argparse.Namespace, out: Path | None):
        import torch

        from metrics import ConfusionMatrix

        self.predictor, self.samples, self.args, self.out = predictor, samples, args, out
        self.device = predictor.runner.device
        self.num_classes = predictor.meta.labels.num_classes
        self.values = predictor.meta.labels.label_values()
        self.cm = ConfusionMatrix(self.num_classes, self.device)
        self.per_image: list = []  # (N, C, C) per batch
        self.stems: list[str] = []
        self.sweep = torch.zeros((2, SWEEP_BINS), dtype=torch.long, device=self.device)  # background / foreground
        self.worst: list = []  # heap of (-iou, plot number, picture): the number breaks ties between equal IoUs
        self.plotted = itertools.count()
        self.pending: list[Future] = []
        self.pool = ThreadPoolExecutor(4)
        self.first_plot = None
        self.pixels = 0

    def add(self, probs, batch: dict) -> None:
        """probs: (N, K, H, W) on the device, for the batch's images."""
        import torch

        import metrics
        from labels import IGNORE_INDEX

        classes = self.predictor.classes(probs)
        self.stems += [self.samples[i].stem for i in batch["index"].tolist()]
        self.pixels += classes.numel()
        ious = truth = None
        if "mask" in batch:
            truth = batch["mask"].to(self.device, non_blocking=True)
            per_image = self.cm.update(classes, truth)
            self.per_image.append(per_image)
            if self.out is not None:  # names the plots; metrics alone never wait for the device
                ious = metrics.mean_foreground_iou(per_image).tolist()
            if self.args.find_threshold:
                valid = truth != IGNORE_INDEX
                q = (probs[:, 0][valid] * SWEEP_BINS).long().clamp_(0, SWEEP_BINS - 1)
                self.sweep.view(-1).index_add_(0, truth[valid].long() * SWEEP_BINS + q, torch.ones_like(q))
        if self.out is not None:
            self.write(probs, classes, truth, ious, batch)

    def write(self, probs, classes, truth, ious: list | None, batch: dict) -> None:
        """Hand each image's files to the thread pool (at most a few batches wait, to bound memory)."""
        probs = probs.float().cpu().numpy() if self.args.raw else [None] * len(classes)
        classes = classes.byte().cpu().numpy()
        truth = truth.cpu().numpy() if truth is not None and self.args.plots else [None] * len(classes)
        thumbs = batch["thumb"].numpy() if "thumb" in batch else [None] * len(classes)
        for k, index in enumerate(batch["index"].tolist()):
            iou = None if ious is None else ious[k]
            self.pending.append(self.pool.submit(self.write_one, self.samples[index].image, probs[k], classes[k],
                                                 truth[k], iou, thumbs[k]))
        while len(self.pending) > 4 * self.args.batch_size:
            self.collect(self.pending.pop(0))

    def write_one(self, image: Path, probs, classes: np.ndarray, truth, iou: float | None, thumb):
        """Masks, probabilities and the plot of one image (in a pool thread); returns the plot's path and a small
        copy of it for worst.png."""
        import cv2

        from fileio import write_image

        stem = image.stem
        write_outputs(self.args, self.out, image, probs, self.values[classes])
        if not self.args.plots:
            return None
        panel = plot_panel(thumb, truth, classes, self.num_classes, stem + ("" if iou is None else f"  IoU {iou:.3f}"))
        path = self.out / "plots" / (f"{stem}_iou{iou:.4f}.png" if iou is not None else f"{stem}.png")
        write_image(path, panel)
        scale = min(1.0, 200 / panel.shape[0])
        return path, iou, cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)

    def collect(self, future: Future) -> None:
        result = future.result()
        if result is None:
            return
        path, iou, small = result
        self.first_plot = self.first_plot or path
        if iou is not None:
            heapq.heappush(self.worst, (-iou, next(self.plotted), small))
            if len(self.worst) > self.args.worst:
                heapq.heappop(self.worst)

    def finish(self) -> None:
        for future in self.pending:
            self.collect(future)
        self.pending.clear()
        self.pool.shutdown()


def predict_all(predictor, loader, evaluation: Evaluation, total: int) -> None:
    """Every batch through the model: whole images on the device; an image over HOST_PIXELS is blended tile by
    tile in host memory, so only tiles occupy the device."""
    import torch
    runner = predictor.runner
    with progress(total=total, desc="predicting", leave=False) as bar:
        for batch in loader:
            images = batch["image"]
            if images.shape[1] * images.shape[2] > HOST_PIXELS and not predictor.meta.resize:
                probs = torch.from_numpy(predictor.predict(images[0].numpy()).probs[None]).to(runner.device)
            else:
                probs = predictor.probabilities(predictor.logits(runner.asarray(images)))
            evaluation.add(probs, batch)
            bar.update(len(images))
    evaluation.finish()


# ------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> int:
    from dataset import SegmentationDataset, masks_elsewhere
    from inference import Predictor
    from loaders import eval_loader, fit_shared_memory, largest_eval_batch
    from runtime import configure, default_workers, select_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("validate.py runs as one process (every process of this torchrun job would score the whole "
                        "set): run it without torchrun, or map the images with torchrun ... predict.py")
    path = model_path(args)
    device = select_device(args.cpu, args.device)
    predictor = Predictor.load(path, device=str(device), amp=args.amp, tile_size=args.tile_size,
                               overlap=args.overlap, tta=args.tta, batch_size=args.batch_size, threshold=args.threshold)
    check_flags(args, predictor, path)
    configure(device)
    data_dir = Path(args.dataset_dir)
    workers = args.workers if args.workers is not None else default_workers(device)
    samples, sizes = check_data(data_dir, predictor, workers)
    has_gt = samples[0].mask is not None
    if args.com and not has_gt:
        raise UserError(f"--com computes metrics only, but {data_dir} has no gt/ folder")
    if not has_gt:
        where = masks_elsewhere(data_dir, predictor.meta.add_dirs)
        print(f"note: {data_dir} has no gt/ folder{where}: predicting only, no metrics")
    out = prepare_output(args, path, data_dir)
    meta = predictor.meta
    dataset = SegmentationDataset(samples, meta.labels, meta.stats, thumbnails=args.plots and not args.com)
    tile = None if meta.resize else predictor.tile_size
    workers, prefetch = fit_shared_memory(workers, largest_eval_batch(sizes, args.batch_size, tile),
                                          meta.in_channels, meta.dtype)
    loader = eval_loader(dataset, sizes, args.batch_size, tile, workers, device, prefetch=prefetch)
    evaluation = Evaluation(predictor, samples, args, None if args.com else out)
    t0 = time.monotonic()
    predict_all(predictor, loader, evaluation, len(samples))
    seconds = time.monotonic() - t0
    print(f"{len(samples)} images, {evaluation.pixels / 1e6:.1f} Mpx in {seconds:.1f}s ({len(samples) / seconds:.1f} "
          f"img/s, {evaluation.pixels / 1e6 / seconds:.2f} Mpx/s) on {device}; outputs in {out}")
    if has_gt:
        report(args, out, path, data_dir, predictor, evaluation)
        if args.find_threshold:
            save_threshold(args, path, threshold_sweep(evaluation.sweep.cpu().numpy(), predictor.threshold))
    if args.vis and evaluation.first_plot:
        show(evaluation.first_plot)
    elif args.vis:
        print("note: --vis shows the first plot; add --plots")
    return 0


def report(args: argparse.Namespace, out: Path, ckpt_path: Path, data_dir: Path, predictor,
           evaluation: Evaluation) -> None:
    import torch

    import metrics
    import visualize
    from fileio import write_image, write_text

    names = predictor.meta.class_names
    s = evaluation.cm.compute()
    keyed = {k: dict(zip(names, s[k], strict=True)) for k in ("per_class_iou", "f1", "precision", "recall")}
    result = {"miou": s["miou"], **keyed, "accuracy": s["accuracy"], "confusion_matrix": s["confusion_matrix"],
              "classes": names, "threshold": predictor.threshold if predictor.meta.binary else None,
              "checkpoint": str(ckpt_path), "dataset": str(data_dir), "images": len(evaluation.stems),
              "tile_size": predictor.tile_size, "overlap": predictor.overlap, "tta": predictor.tta}
    write_text(out / "metrics.json", json.dumps(clean(result), indent=2) + "\n")
    per_image = torch.cat(evaluation.per_image).cpu()
    scores = metrics.class_scores(per_image)
    miou = metrics.mean_foreground_iou(per_image).tolist()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", *[f"iou_{n}" for n in names], "miou", *[f"f1_{n}" for n in names[1:]]])
    for k, stem in enumerate(evaluation.stems):
        w.writerow([stem, *[_cell(v) for v in scores["iou"][k].tolist()], f"{miou[k]:.6f}",
                    *[_cell(v) for v in scores["f1"][k, 1:].tolist()]])
    write_text(out / "per_image.csv", buf.getvalue())
    if not args.com:
        write_image(out / "confusion_matrix.png", visualize.confusion_png(np.asarray(s["confusion_matrix"]), names))
    if evaluation.worst and not args.com:
        panels = [p for _, _, p in sorted(evaluation.worst, key=lambda t: -t[0])]
        write_image(out / "worst.png", visualize.stack_rows(panels))
    print(f"{'class':>8} {'IoU':>7} {'F1':>7} {'prec':>7} {'recall':>7}")
    for i, n in enumerate(names):
        print(f"{n:>8} " + " ".join(f"{v:7.4f}" for v in (s["per_class_iou"][i], s["f1"][i], s["precision"][i],
                                                           s["recall"][i])))
    print(f"accuracy {s['accuracy']:.4f}" + (f", threshold {predictor.threshold:.2f}" if predictor.meta.binary else ""))
    print(f"mIoU: {s['miou']:.4f}")


def _cell(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6f}"


def threshold_sweep(hist: np.ndarray, current: float) -> float:
    """IoU of the foreground at every threshold, from per-bin pixel counts; prints a table, returns the best."""
    bg, fg = hist.astype(np.float64)
    above_bg, above_fg = np.cumsum(bg[::-1])[::-1], np.cumsum(fg[::-1])[::-1]  # pixels with probability >= bin

    def iou(t: float) -> float:
        k = min(SWEEP_BINS - 1, round(t * SWEEP_BINS))
        tp, fp = above_fg[k], above_bg[k]
        return tp / max(fg.sum() + fp, 1)

    grid = np.arange(0.01, 0.995, 0.01)
    best = round(float(grid[int(np.argmax([iou(t) for t in grid]))]), 2)
    print("threshold   IoU")
    for t in sorted({*np.round(np.arange(0.05, 0.951, 0.05), 2).tolist(), best, round(current, 2)}):
        mark = "  <- best" if t == best else "  <- the model's" if t == round(current, 2) else ""
        print(f"   {t:.2f}   {iou(t):.4f}{mark}")
    print(f"best threshold {best:.2f}: IoU {iou(best):.4f} (at {current:.2f}: {iou(current):.4f})")
    return best


def save_threshold(args: argparse.Namespace, path: Path, best: float) -> None:
    """--save-threshold: the checkpoint rewritten (atomically) with the best threshold in its metadata."""
    from dataclasses import replace

    import checkpoint

    if not args.save_threshold:
        return
    ckpt = checkpoint.load(path)
    checkpoint.save(path, replace(ckpt, meta=replace(ckpt.meta, threshold=best)))
    print(f"saved threshold {best:.2f} in {path}; later runs use it unless -t is given")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
