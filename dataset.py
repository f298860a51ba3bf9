"""Plain-folder segmentation datasets: find and pair files, read samples (image bands stacked, mask label values mapped
to classes), and serve them as numpy arrays (the DataLoader turns them into tensors; this module never imports torch,
so the dataset tools start fast). The checks that run over a whole dataset are in checks.py, label values and
normalisation in labels.py.

Layout: <split>/images, <split>/gt (masks) and optional one-band folders (<split>/nir, ...), files paired by name
stem (`a.tif` may have mask `a.png`). Images are HWC numpy arrays in their own dtype until the model's first layer
normalises them; masks become HW uint8 class indices, with IGNORE_INDEX for pixels that count in neither loss nor
metrics.
"""
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError, problem_list, shown
from fileio import IMAGE_EXTENSIONS, is_image_file, read_image
from labels import ChannelStats, Labels, unit_scaling

RESERVED_FOLDERS = ("images", "gt")


@dataclass
class Sample:
    stem: str
    image: Path
    mask: Path | None
    bands: list[Path] = field(default_factory=list)


def check_band_names(add_dirs: list[str], flag: str = "--add-dirs") -> None:
    """Extra band folders are plain folder names beside images/, never the images or the masks themselves."""
    for name in add_dirs:
        if name in RESERVED_FOLDERS:
            what = "the masks" if name == "gt" else "the input images"
            raise UserError(f"{flag} {name}: '{name}/' holds {what}, not an extra band; name the band folders only, "
                            'e.g. --add-dirs "nir"')
        if name in (".", "..") or "/" in name or "\\" in name:
            raise UserError(f"{flag} {name}: give the name of a folder beside images/ (e.g. nir), not a path")
    if len(set(add_dirs)) != len(add_dirs):
        raise UserError(f"{flag} names a folder twice: {' '.join(add_dirs)}")


def _files_by_stem(folder: Path) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in folder.iterdir():
        if is_image_file(p):
            by_stem[p.stem].append(p)
    clashes = [sorted(ps) for ps in by_stem.values() if len(ps) > 1]
    if clashes:
        names = shown([" and ".join(p.name for p in ps) for ps in clashes])
        raise UserError(f"{folder}: several files share a name stem ({names}); keep one file per stem")
    return {stem: ps[0] for stem, ps in by_stem.items()}


def masks_elsewhere(split_dir: Path, add_dirs: list[str]) -> str:
    """Where a split has no gt/ but other folders than images/ and the bands: those it holds, and the rename where
    one of them can be the masks; else nothing."""
    inside = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    others = [name for name in inside if name not in ("images", *add_dirs)]
    if not others:
        return ""
    rename = f"; if {others[0]}/ holds the masks, rename it gt/" if len(others) == 1 else ""
    return f" ({split_dir.name}/ holds {', '.join(n + '/' for n in inside[:6])}{rename})"


def pair_files(split_dir: Path, add_dirs: list[str], masks: str = "required") -> tuple[list[Sample], list[str]]:
    """Pair <split_dir>/images with gt/ and the extra band folders by file stem: the complete samples, and one line
    per file without its partner. Missing folders raise.

    masks: "required" (training), "optional" (use gt/ when it exists), "none".
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"dataset folder {split_dir} not found; expected {split_dir}/images and {split_dir}/gt")
    img_dir = split_dir / "images"
    if not img_dir.is_dir():
        inside = sorted(p.name + "/" for p in split_dir.iterdir() if p.is_dir())
        raise UserError(f"{img_dir} not found ({split_dir.name}/ holds {', '.join(inside[:6]) or 'no folders'}): put "
                        "the input images in an 'images' folder and the masks in 'gt'")
    images = _files_by_stem(img_dir)
    if not images:
        raise UserError(f"{img_dir} holds no images ({' '.join(IMAGE_EXTENSIONS)}); the images/ folder is empty")
    gt_dir = split_dir / "gt"
    use_masks = masks == "required" or (masks == "optional" and gt_dir.is_dir())
    if use_masks and not gt_dir.is_dir():
        raise UserError(f"{gt_dir} not found{masks_elsewhere(split_dir, add_dirs)}: put the masks in a 'gt' folder "
                        "next to images/, same file names")
    folders = {"gt": gt_dir} if use_masks else {}
    for d in add_dirs:
        if not (split_dir / d).is_dir() and "," in d:
            raise UserError(f"--add-dirs {d}: no folder {split_dir / d}; separate the band folders with spaces, "
                            f"e.g. --add-dirs \"{' '.join(filter(None, d.split(',')))}\"")
        if not (split_dir / d).is_dir():
            raise UserError(f"{split_dir / d} not found: the extra band folder '{d}' (--add-dirs) must sit next to "
                            "images/ in every split")
        folders[d] = split_dir / d
    found = {name: _files_by_stem(folder) for name, folder in folders.items()}
    problems = []
    for name, files in found.items():
        _check_affix(images, files, folders[name])
        _check_affix(files, images, img_dir)
        for stem in sorted(set(images) - set(files)):
            problems.append(f"{images[stem]} has no partner in {name}/ (expected {folders[name] / stem}.<ext>)")
        for stem in sorted(set(files) - set(images)):
            problems.append(f"{files[stem]} has no image in images/ (expected {img_dir / stem}.<ext>)")
    complete = [stem for stem in sorted(images) if all(stem in files for files in found.values())]
    return [Sample(stem, images[stem], found["gt"][stem] if use_masks else None, [found[d][stem] for d in add_dirs])
            for stem in complete], problems


def _check_affix(partners: dict[str, Path], files: dict[str, Path], folder: Path) -> None:
    """Raise if every file of `folder` without a partner is named like a partner with one same text added
    (gt/0_mask.png beside images/0.png): one rename pairs them all, which says more than listing each file."""
    lonely = sorted(set(files) - set(partners))
    if not lonely:
        return
    first, options = lonely[0], []  # (partner stem, text before it, text after it), longest stems first
    for stem in sorted((s for s in partners if len(s) < len(first)), key=len, reverse=True):
        options += [(stem, "", first[len(stem):])] if first.startswith(stem) else []
        options += [(stem, first[:-len(stem)], "")] if first.endswith(stem) else []
    for stem, before, after in options:
        if all(s.startswith(before) and s.endswith(after) and s[len(before):len(s) - len(after)] in partners
               for s in lonely):
            where = f"with '{after}' after it" if after else f"with '{before}' before it"
            raise UserError(f"{folder}: its files are named like their partner in {partners[stem].parent.name}/ "
                            f"{where} ({files[first].name} for {partners[stem].name}), but files pair by identical "
                            f"names: rename them, e.g. {files[first].name} -> {stem}{files[first].suffix}")


def find_samples(split_dir: Path, add_dirs: list[str], masks: str = "required") -> list[Sample]:
    """The paired samples of a split folder; any file without its partner is an error listing them all."""
    samples, problems = pair_files(split_dir, add_dirs, masks)
    if problems:
        raise problem_list(f"{len(problems)} unpaired file(s) in {split_dir}; add the missing partner or remove "
                           "the file:", problems)
    return samples


def split_folders(root: Path) -> list[Path]:
    """The split folders of a dataset root (train/, val/, test/), or the folder itself if it holds images/."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    if (root / "images").is_dir():
        return [root]
    splits = [root / s for s in ("train", "val", "test") if (root / s / "images").is_dir()]
    if not splits:
        raise UserError(f"{root} holds neither images/ nor train/images, val/images: not a dataset folder")
    return splits


def folder_label(folder: Path) -> str:
    """A readable name for a data folder: `city_val` for city/val, else the folder's own name."""
    folder = Path(folder).resolve()
    return f"{folder.parent.name}_{folder.name}" if folder.name in ("train", "val", "test") else folder.name


def band_folders(split_dir: Path) -> list[str]:
    """Folders beside images/ and gt/ that hold images: the extra bands."""
    return sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir() and p.name not in RESERVED_FOLDERS
                  and not p.name.startswith(".") and any(is_image_file(f) for f in p.iterdir()))


def mask_to_2d(mask: np.ndarray, path: Path) -> np.ndarray:
    """A mask as one (H, W) integer array; grey masks saved as RGB are accepted, colour-painted ones are not."""
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[..., :3]
        if not (mask == mask[..., :1]).all():
            raise UserError(f"{path}: mask is a colour (RGB) image; masks must hold one label value per pixel: "
                            "convert it with dataset_utils/convert_classes_in_masks.py --palette")
        mask = mask[..., 0]
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or (mask != np.round(mask)).any():
            raise UserError(f"{path}: mask holds non-integer values; masks must hold integer label values")
        mask = mask.astype(np.int64)
    if mask.dtype.kind not in "ui" or (mask.dtype.kind == "i" and mask.size and mask.min() < 0):
        raise UserError(f"{path}: mask values must be non-negative integers (found dtype {mask.dtype})")
    if mask.dtype != np.uint8 and mask.max(initial=0) > 65535:
        raise UserError(f"{path}: mask values above 65535 are not supported")
    return mask if mask.dtype in (np.uint8, np.uint16) else mask.astype(np.uint16)


def read_sample(sample: Sample, lut: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image with its bands stacked as (H, W, C) and the mask as (H, W) uint8 class indices (None if no gt)."""
    parts, mask = read_parts(sample)
    return stack_parts(parts), (lut[mask] if lut is not None and mask is not None else mask)


def stack_parts(parts: list[np.ndarray]) -> np.ndarray:
    """(H, W, C) parts as one array: their dtype where all share it, else float32."""
    if len({p.dtype for p in parts}) > 1:
        parts = [p.astype(np.float32) for p in parts]
    return np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def read_parts(sample: Sample) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The image and each band as (H, W, C) arrays of the same size, and the mask's label values (None if no gt)."""
    image = read_image(sample.image)
    parts = [image if image.ndim == 3 else image[..., None]]
    for band_path in sample.bands:
        band = read_image(band_path)
        if band.ndim == 3:
            if band.shape[2] != 1 and not (band == band[..., :1]).all():
                raise UserError(f"{band_path}: an extra band must be a one-channel image, this one has "
                                f"{band.shape[2]} different channels")
            band = band[..., 0]
        if band.shape != image.shape[:2]:
            raise UserError(f"{band_path}: band is {_hw(band.shape)} but its image {sample.image} is "
                            f"{_hw(image.shape)}; all files of a sample must have the same size")
        parts.append(band[..., None])
    if sample.mask is None:
        return parts, None
    mask = mask_to_2d(read_image(sample.mask, palette_indices=True), sample.mask)
    if mask.shape != image.shape[:2]:
        raise UserError(f"{sample.mask}: mask is {_hw(mask.shape)} but its image {sample.image} is "
                        f"{_hw(image.shape)}; masks must have the size of their image")
    return parts, mask


def _hw(shape: tuple) -> str:
    return f"{shape[1]}x{shape[0]}"


class SegmentationDataset:
    """A map-style dataset for torch's DataLoader: item -> {"image": (H, W, C), "mask": (H, W) uint8 classes,
    "index"} as numpy arrays, which the loader stacks into tensors. Images stay un-normalised (the model's first
    layer normalises on the device, see model.Normalize): uint8 as it is, other types as float32.

    With a transform (training), non-uint8 images are augmented scaled to [0, 1] by the training set's exact
    per-channel range (albumentations clips floats to [0, 1]), and come out in that unit scale. A key may be
    (index, seed): the sample's augmentation is drawn from that seed alone, which makes an epoch reproducible
    whatever the number of workers, and a resumed run identical to an uninterrupted one.
    thumbnails: add "thumb", an 8-bit RGB picture of the image, for plots.
    """

    def __init__(self, samples: list[Sample], labels: Labels, stats: ChannelStats, transform=None, cache=None,
                 thumbnails: bool = False):
        self.samples = samples
        self.lut = labels.lut()
        self.transform, self.cache, self.thumbnails = transform, cache, thumbnails
        self.lo, self.inv_range = unit_scaling(stats)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw (H, W, C) image and (H, W) class-index mask (None when the sample has no mask)."""
        if self.cache is not None:
            return self.cache.views(index)
        image, mask = read_sample(self.samples[index], self.lut)
        return image.reshape(*image.shape[:2], -1), mask

    def augment(self, index: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The sample after the transform: uint8, or float32 in [0, 1]."""
        image, mask = self.load(index)
        mask = np.zeros(image.shape[:2], np.uint8) if mask is None else mask
        if image.dtype != np.uint8:
            image = np.clip((image.astype(np.float32) - self.lo) * self.inv_range, 0, 1, dtype=np.float32)
        if seed is not None:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=image, mask=mask)
        return out["image"].reshape(*out["image"].shape[:2], -1), out["mask"]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.transform is not None:
            image, mask = self.augment(index, seed)
        else:
            image, mask = self.load(index)
            image = image if image.dtype == np.uint8 else image.astype(np.float32)
        # Contiguous and writable: views of the read-only RAM cache are copied (torch warns on read-only arrays).
        item = {"image": np.require(image, requirements="CW"), "index": index}
        if mask is not None:
            item["mask"] = np.require(mask, requirements="CW")
        if self.thumbnails:
            from visualize import to_rgb8

            item["thumb"] = to_rgb8(image)
        return item
