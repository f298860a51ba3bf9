"""Make the README's pictures in img/ from the bundled sample: train a model on it, validate it, and draw.

  python img/make_pictures.py                 # about 3 minutes on a CPU; re-running regenerates every picture
  python img/make_pictures.py --epochs 10     # quicker, with a weaker model

Everything goes through the kit's own command lines (train.py, validate.py, python -m visualize); the training run
and its outputs live in a temporary folder that is removed at the end (--keep keeps it).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import visualize  # noqa: E402
from augmentations import train_transform  # noqa: E402
from checks import channel_stats, inspect_sample  # noqa: E402
from cli import Parser, at_least  # noqa: E402
from dataset import SegmentationDataset, find_samples  # noqa: E402
from errors import UserError, run_cli  # noqa: E402
from fileio import read_image, write_image  # noqa: E402
from labels import Labels  # noqa: E402

IMG = ROOT / "img"
SAMPLE = ROOT / "data" / "sample"
MAX_BYTES = 300_000  # each picture stays light enough for a README
PRESETS = ("safe", "light", "medium", "hard")


def run(*args) -> None:
    """One of the kit's command lines, with this interpreter; its output shown as it comes."""
    print("$", " ".join(str(a) for a in args), flush=True)
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT)
    if r.returncode:
        raise UserError(f"{args[0]} failed (exit status {r.returncode}); see its message above")


def prediction_panels(plots: Path, n: int = 3) -> np.ndarray:
    """validate.py's pictures (image | truth | prediction | errors) of the val images with the most water."""
    water = {p.stem: (read_image(p) > 0).mean() for p in (SAMPLE / "val" / "gt").iterdir()}
    chosen = sorted(water, key=water.get)[-n:][::-1]
    return visualize.stack_rows([read_image(next(plots.glob(f"{stem}_iou*.png"))) for stem in chosen], gap=8)


def augmentation_grid(rows: tuple[int, ...] = (0, 2), size: int = 128) -> np.ndarray:
    """The same training tiles under each preset (mask drawn over the image; grey: pixels the loss ignores)."""
    samples = [find_samples(SAMPLE / "train", ["nir"])[i] for i in rows]
    infos = [inspect_sample(s, with_stats=True) for s in samples]
    labels = Labels.from_args(None, None, None)
    stats = channel_stats(infos, labels)
    sets = {p: SegmentationDataset(samples, labels, stats, train_transform(p, size, False, False)) for p in PRESETS}
    pictures = []
    for i in range(len(samples)):
        image, mask = sets["safe"].load(i)
        tiles = [visualize.overlay(visualize.to_rgb8(image), mask, 2)]
        for p in PRESETS:
            aug, aug_mask = sets[p].augment(i, seed=7 + i)
            tiles.append(visualize.overlay(visualize.to_rgb8(aug), aug_mask, 2))
        pictures.append(visualize.panel(tiles, ["original", *PRESETS] if i == 0 else None))
    return visualize.stack_rows(pictures)


def tensorboard_worst(exp: Path) -> np.ndarray:
    """The last worst-val-images grid train.py logged to TensorBoard, as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(exp), size_guidance={IMAGES: 0}).Reload()
    png = events.Images("val/worst")[-1].encoded_image_string
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def posterize(picture: np.ndarray, bits: int = 6) -> np.ndarray:
    """6 bits per channel: no visible change in a README, a third of the PNG's bytes for satellite imagery."""
    step = 1 << (8 - bits)
    return np.ascontiguousarray(picture // step * step + step // 2)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("-e", "--epochs", type=at_least(1), default=30, help="training epochs on the sample (30)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder with the run and its outputs")
    return p


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="segkit-pictures-"))
    try:
        exp = work / "logs" / "sample"
        run("train.py", "-d", SAMPLE, "--add-dirs", "nir", "-e", args.epochs, "--encoder-weights", "none",
            "-log", work / "logs", "--exp-name", "sample")
        run("validate.py", "-cd", exp, "-d", SAMPLE / "val", "--plots", "-o", work / "val")
        run("-m", "visualize", "curves", exp, "-o", IMG / "curves.png")
        pictures = {"predictions.png": prediction_panels(work / "val" / "plots"),
                    "augmentations.png": augmentation_grid(),
                    "confusion_matrix.png": read_image(work / "val" / "confusion_matrix.png"),
                    "tensorboard_worst.png": tensorboard_worst(exp)}
        for name, picture in pictures.items():
            write_image(IMG / name, posterize(picture))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for p in sorted(IMG.glob("*.png")):
        print(f"{p.relative_to(ROOT)}  {p.stat().st_size / 1000:.0f} KB")
        if p.stat().st_size > MAX_BYTES:
            raise UserError(f"{p} is over {MAX_BYTES // 1000} KB; make it smaller before committing it")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
