"""Augmentation presets: short lists of albumentations 2.x transforms, one function per name.

Transforms see 8-bit images (any channel count) or float32 images in [0, 1] (other dtypes, scaled by the training
set's per-channel range, see dataset.py), so intensity transforms mean the same for RGB, 4 or 13 bands, 8 or 16 bit.
Geometry applies to the image, its stacked extra bands and the mask alike; pixels a transform invents (padding,
rotated corners) get the ignore class in the mask, so the loss never learns from them. Colour transforms that
need 3-channel 8-bit input are added only for such input.

Preview a preset:  python -m augmentations --preview data/sample -a hard -n 8 --add-dirs nir
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

import visualize
from checks import channel_stats, dataset_problems, inspect_sample
from cli import Parser, at_least, multiple_of_32
from dataset import SegmentationDataset, find_samples
from errors import UserError, run_cli
from fileio import image_header, output_folder, write_image
from labels import IGNORE_INDEX, Labels

FILL = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": IGNORE_INDEX}


def albumentations():
    """The albumentations module, imported when a preset is built: it loads torch, which --help need not wait for."""
    import albumentations

    return albumentations


def none(rgb8: bool) -> list:
    return []


def safe(rgb8: bool) -> list:
    """The 8 flips and right-angle rotations: nothing is invented, right for top-down imagery."""
    A = albumentations()
    return [A.SquareSymmetry(p=1)]


def light(rgb8: bool) -> list:
    A = albumentations()
    return [
        A.SquareSymmetry(p=1),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.5, **FILL),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


def medium(rgb8: bool) -> list:
    A = albumentations()
    return [
        A.SquareSymmetry(p=1),
        A.Affine(scale=(0.75, 1.33), translate_percent=(-0.1, 0.1), rotate=(-45, 45), p=0.7, **FILL),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.OneOf([A.GaussianBlur(sigma_limit=(0.3, 1.2)), A.GaussNoise(std_range=(0.01, 0.05))], p=0.3),
        *([A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=0.3)] if rgb8 else []),
    ]


def hard(rgb8: bool) -> list:
    A = albumentations()
    return [
        A.SquareSymmetry(p=1),
        A.Affine(scale=(0.5, 1.5), translate_percent=(-0.15, 0.15), rotate=(-60, 60), shear=(-10, 10), p=0.9,
                 **FILL),
        A.OneOf([A.GridDistortion(distort_limit=0.2, **FILL), A.OpticalDistortion(distort_limit=0.2, **FILL)],
                p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
        A.RandomGamma(gamma_limit=(70, 140), p=0.4),
        A.OneOf([A.GaussianBlur(sigma_limit=(0.3, 2.0)), A.MotionBlur(blur_limit=(3, 7)),
                 A.GaussNoise(std_range=(0.02, 0.1))], p=0.5),
        A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.03, 0.12), hole_width_range=(0.03, 0.12),
                        fill=0, p=0.3),
        *([A.OneOf([A.HueSaturationValue(hue_shift_limit=15, sat_shift_limit=30, val_shift_limit=20),
                    A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20),
                    A.CLAHE(clip_limit=3.0), A.ToGray(p=1)], p=0.5)] if rgb8 else []),
    ]


PRESETS = {"none": none, "safe": safe, "light": light, "medium": medium, "hard": hard}


def train_transform(preset: str, image_size: int, rgb8: bool, resize: bool, pad: bool = True):
    """Bring every training sample to image_size x image_size (random crop, padding, or --resize), then the preset.
    pad=False leaves the padding step out when no image is smaller than the crop (it would copy every sample)."""
    A = albumentations()
    if resize:
        size = [A.Resize(image_size, image_size)]
    else:
        size = [A.PadIfNeeded(image_size, image_size, position="random", **FILL)] if pad else []
        size.append(A.RandomCrop(image_size, image_size))
    return A.Compose(size + PRESETS[preset](rgb8))


def auto_image_size(sizes: list[tuple[int, int]]) -> int:
    """The largest multiple of 32 that fits the median image's short side, capped at 512."""
    side = int(np.median([min(h, w) for h, w in sizes]))
    if side < 32:
        raise UserError(f"training images are too small ({side} px on the short side); they must be at least "
                        "32 px, or pass --image-size with --resize")
    return min(512, side // 32 * 32)


# ------------------------------------------------------------------------------------------------------ preview
def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description="Write before/after pictures of an augmentation preset.",
               epilog="example: python -m augmentations --preview data/sample -a hard -n 8 --add-dirs nir")
    p.add_argument("--preview", required=True, metavar="DIR",
                   help="a dataset root (uses its train/ split) or a split folder holding images/ and gt/")
    p.add_argument("-a", "--aug", default="medium", choices=list(PRESETS), help="preset to show (medium)")
    p.add_argument("-n", "--num", type=at_least(1), default=8, help="number of samples (8)")
    p.add_argument("-k", "--variants", type=at_least(1), default=4, help="augmented versions per sample (4)")
    p.add_argument("--image-size", type=multiple_of_32("--image-size"), default=None,
                   help="training crop size (default: the one train.py would choose for these images)")
    p.add_argument("--resize", action="store_true", help="resize instead of random crop")
    p.add_argument("--add-dirs", default="", help="extra one-band folders, e.g. 'nir'")
    p.add_argument("--class-list", default=None, help="mask label values that are classes (default 255)")
    p.add_argument("--max-mask-val", type=at_least(1), default=None, help="classes are values 1..N")
    p.add_argument("-o", "--output-dir", default="aug_preview", help="where the pictures go (aug_preview)")
    p.add_argument("--seed", type=at_least(0), default=0, help="the same seed draws the same augmentations (0)")
    return p


def preview(args: argparse.Namespace) -> int:
    root = Path(args.preview)
    split = root / "train" if (root / "train" / "images").is_dir() else root
    labels = Labels.from_args(args.class_list, args.max_mask_val, None)
    samples = find_samples(split, args.add_dirs.split(), masks="optional")[: args.num]
    infos = [inspect_sample(s, with_stats=True) for s in samples]
    problems = dataset_problems(infos, None, split.name)
    if problems:
        raise UserError("\n  ".join(problems))
    stats = channel_stats(infos, labels)
    headers = [image_header(s.image) for s in find_samples(split, args.add_dirs.split(), masks="optional")]
    size = args.image_size or auto_image_size([(h.height, h.width) for h in headers if h]
                                              or [(i.height, i.width) for i in infos])
    transform = train_transform(args.aug, size, infos[0].channels == 3 and infos[0].dtype == "uint8", args.resize)
    ds = SegmentationDataset(samples, labels, stats, transform)
    out = output_folder(Path(args.output_dir), "-o")
    for index, sample in enumerate(samples):
        image, mask = ds.load(index)
        mask = np.zeros(image.shape[:2], np.uint8) if mask is None else mask  # no gt/: the image alone
        tiles = [visualize.overlay(visualize.to_rgb8(image), mask, labels.num_classes)]
        for k in range(args.variants):
            aug, aug_mask = ds.augment(index, seed=args.seed * 1000 + k)
            tiles.append(visualize.overlay(visualize.to_rgb8(aug), aug_mask, labels.num_classes))
        picture = visualize.panel(tiles, ["original"] + [f"{args.aug} #{k + 1}" for k in range(args.variants)])
        write_image(out / f"{sample.stem}.png", np.ascontiguousarray(picture))
    print(f"wrote {len(samples)} pictures of preset '{args.aug}' at {size} px crops to {out}/ (grey: pixels ignored "
          "by the loss)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: preview(get_args_parser().parse_args()))
