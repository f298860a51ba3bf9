"""Plain-folder segmentation datasets: find and pair files, map label values to classes, check, measure, and serve
samples as numpy arrays (the DataLoader turns them into tensors; this module never imports torch, so the dataset
tools start fast).

Layout: <split>/images, <split>/gt (masks) and optional one-band folders (<split>/nir, ...), files paired by name
stem (`a.tif` may have mask `a.png`). Images are HWC numpy arrays in their own dtype until the model's first layer
normalises them; masks become HW uint8 class indices, with IGNORE_INDEX for pixels that count in neither loss nor
metrics.
"""
import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from errors import UserError, problem_list, raise_problems
from fileio import IMAGE_EXTENSIONS, exif_orientation, is_image_file, read_image, write_text

IGNORE_INDEX = 255  # class index of ignored pixels (--ignore-label, padding, fill of rotated corners)
MAX_CLASSES = 254
MAX_LISTED = 6  # problems / files shown per message before "... and N more"
RESERVED_FOLDERS = ("images", "gt")
CHECK_RULES = 4  # raised when check_splits learns new rules: datasets checked by older rules are checked again


def _more(items: list, n: int = MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" ... and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------- finding files
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
        names = _more([" and ".join(p.name for p in ps) for ps in clashes])
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


# ---------------------------------------------------------------------------------------------------- labels
@dataclass
class Labels:
    """Which mask values are classes. Class 0 is background (value 0); class i is values[i-1].

    strict: values outside the list are an error (the default list, --max-mask-val); with an explicit --class-list
    they are picked out and count as background.
    """
    values: list[int]
    ignore: int | None = None
    strict: bool = True
    flag: str = "--class-list"  # how the user chose the values, for messages
    given_names: list[str] = field(default_factory=list)  # --class-names, background first; empty: by value

    @classmethod
    def from_args(cls, class_list: str | None, max_mask_val: int | None, ignore_label: int | None,
                  class_names: str | None = None) -> "Labels":
        labels = cls._from_values(class_list, max_mask_val, ignore_label)
        return replace(labels, given_names=labels.parse_names(class_names)) if class_names else labels

    @classmethod
    def _from_values(cls, class_list: str | None, max_mask_val: int | None, ignore_label: int | None) -> "Labels":
        if ignore_label is not None and not 0 <= ignore_label <= 65535:
            raise UserError(f"--ignore-label {ignore_label} must be a mask value between 0 and 65535")
        if max_mask_val is not None:
            if class_list is not None:
                raise UserError("--class-list and --max-mask-val both given; use one")
            if not 1 <= max_mask_val <= MAX_CLASSES:
                raise UserError(f"--max-mask-val {max_mask_val} must be between 1 and {MAX_CLASSES}")
            if ignore_label is not None and 1 <= ignore_label <= max_mask_val:
                raise UserError(f"--ignore-label {ignore_label} is one of the classes 1..{max_mask_val}; a value is a "
                                "class or ignored")
            return cls(list(range(1, max_mask_val + 1)), ignore_label, True, f"--max-mask-val {max_mask_val}")
        strict = class_list is None
        try:
            values = [int(v) for v in (class_list or "255").replace(",", " ").split()]
        except ValueError:
            raise UserError(f"--class-list '{class_list}' must be label values separated by spaces, e.g. "
                            "--class-list \"1 2 5\"") from None
        if not values or len(set(values)) != len(values) or min(values) < 0 or max(values) > 65535:
            raise UserError(f"--class-list '{class_list}' must list distinct mask values between 0 and 65535")
        if len(values) > MAX_CLASSES:
            raise UserError(f"--class-list has {len(values)} values; at most {MAX_CLASSES} classes are supported")
        if ignore_label is not None and ignore_label in values:
            raise UserError(f"--ignore-label {ignore_label} is also in --class-list; a value is a class or ignored")
        return cls(values, ignore_label, strict, ("the default " if strict else "") + "--class-list "
                   + " ".join(map(str, values)))

    @property
    def num_classes(self) -> int:
        return len(self.values) + 1

    @property
    def binary(self) -> bool:
        return len(self.values) == 1

    @property
    def out_channels(self) -> int:
        """Model outputs: one logit (sigmoid) for binary, one per class (softmax) otherwise."""
        return 1 if self.binary else self.num_classes

    @property
    def names(self) -> list[str]:
        """Class names, background first: the user's (--class-names), else the label values (background is 0
        unless 0 is itself a listed class)."""
        return self.given_names or ["bg" if 0 in self.values else "0", *map(str, self.values)]

    def parse_names(self, text: str) -> list[str]:
        """--class-names: a file with one name per line, or names separated by commas (or spaces where there is no
        comma), one per class value in --class-list order, optionally with the background's name first."""
        path = Path(text)
        if path.suffix.lower() in (".txt", ".csv") or path.is_file():
            if not path.is_file():
                raise UserError(f"--class-names {text}: file not found")
            from fileio import read_list

            names = read_list(path, "--class-names")
        else:
            names = [n.strip() for n in (text.split(",") if "," in text else text.split())]
        if len(names) == len(self.values):
            names = ["background", *names]
        if len(names) != len(self.values) + 1:
            raise UserError(f"--class-names gives {len(names)} name(s) for the {len(self.values)} class value(s) of "
                            f"{self.flag}: give one name per value, in that order (the background's name first, if "
                            "you like), e.g. --class-names \"water\"")
        if not all(n and n.isprintable() for n in names) or len(set(names)) != len(names):
            raise UserError(f"--class-names {text!r}: names must be distinct and not empty")
        return names

    def suggested(self, found) -> list[int]:
        """The values a --class-list would list for masks holding `found`: all but background and the ignored."""
        return sorted(v for v in found if v != 0 and v != self.ignore)

    def known(self) -> set[int]:
        return {0, *self.values} | ({self.ignore} if self.ignore is not None else set())

    def lut(self, size: int = 65536) -> np.ndarray:
        """Lookup table label value -> class index for uint8/uint16 masks."""
        lut = np.zeros(size, np.uint8)
        for cls, v in enumerate(self.values, start=1):
            if v < size:
                lut[v] = cls
        if self.ignore is not None and 0 <= self.ignore < size:
            lut[self.ignore] = IGNORE_INDEX
        return lut

    def label_values(self) -> np.ndarray:
        """Class index -> the dataset's label value (background 0): masks written back in the user's values."""
        values = np.array([0, *self.values])
        return values.astype(np.uint8 if values.max() <= 255 else np.uint16)

    def to_meta(self) -> dict:
        named = {"names": self.given_names} if self.given_names else {}
        return {"values": self.values, "ignore": self.ignore, "strict": self.strict, "flag": self.flag, **named}

    @classmethod
    def from_meta(cls, meta: dict) -> "Labels":
        return cls(list(meta["values"]), meta["ignore"], meta["strict"], meta["flag"], list(meta.get("names", [])))


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


# ------------------------------------------------------------------------------------------- reading samples
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


def nonfinite_problem(image: np.ndarray, path: Path) -> str | None:
    """NaN or infinite pixels poison normalisation and the loss: a message naming the file, or None."""
    if image.dtype.kind != "f":
        return None
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if not bad:
        return None
    return (f"{path}: {bad} pixel value(s) are NaN or infinite (nodata?); replace them with a number, e.g. with "
            "dataset_utils/filter_dataset.py --nodata nan to find such samples, before training or evaluating")


# ------------------------------------------------------------------------------------------------ scanning
@dataclass
class SampleInfo:
    """What one pass over a sample learns: size, channels, dtype, mask values, pixel sums (or the error)."""
    stem: str
    image: str
    mask: str | None
    error: str | None = None
    height: int = 0
    width: int = 0
    channels: int = 0
    dtype: str = ""  # of the stacked image
    types: str = ""  # the files' own pixel types: "uint8", or "uint16 image + uint8 nir" where they differ
    mask_values: dict[int, int] = field(default_factory=dict)
    digest: str = ""  # of the image's pixels: copies under other names (or formats) share it
    image_is_mask: bool = False  # the image holds its own mask's values: masks given as images
    orientation: int = 0  # a JPEG's EXIF orientation (2-8: read turned upright, as viewers show it)
    mins: np.ndarray | None = None  # per channel
    maxs: np.ndarray | None = None
    sums: np.ndarray | None = None  # per channel, float64, with_stats only
    sumsq: np.ndarray | None = None


def inspect_sample(sample: Sample, with_stats: bool) -> SampleInfo:
    info = SampleInfo(sample.stem, str(sample.image), str(sample.mask) if sample.mask else None)
    try:
        parts, mask = read_parts(sample)
    except UserError as e:
        info.error = str(e)
        return info
    image = stack_parts(parts)
    info.error = nonfinite_problem(image, sample.image)
    info.height, info.width, info.channels = image.shape
    info.dtype = str(image.dtype)
    types = [str(p.dtype) for p in parts]
    info.types = types[0] if len(set(types)) == 1 else " + ".join(
        f"{t} {name}" for t, name in zip(types, ["image", *(b.parent.name for b in sample.bands)], strict=True))
    info.digest = hashlib.blake2b(image.tobytes(), digest_size=10).hexdigest()
    info.orientation = exif_orientation(sample.image) if sample.image.suffix.lower() in (".jpg", ".jpeg") else 0
    if mask is not None:
        counts = np.bincount(mask.ravel(), minlength=1)
        info.mask_values = {int(v): int(c) for v, c in enumerate(counts) if c}
        info.image_is_mask = bool(parts[0].shape[:2] == mask.shape and (parts[0][..., 0] == mask).all())
    if info.error is None:
        flat = image.reshape(-1, image.shape[2])
        info.mins, info.maxs = flat.min(0).astype(np.float64), flat.max(0).astype(np.float64)
        if with_stats:
            flat = flat.astype(np.float64)
            info.sums, info.sumsq = flat.sum(0), (flat * flat).sum(0)
    return info


def scan_samples(samples: list[Sample], with_stats: bool, workers: int, desc: str = "checking") -> list[SampleInfo]:
    """Read every sample once, `workers` at a time (decoders release the GIL), and return what was learnt; never
    raises for bad files."""
    from cli import progress

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(progress(pool.map(lambda s: inspect_sample(s, with_stats), samples), total=len(samples),
                             desc=desc, leave=False, disable=len(samples) < 200))


def dataset_problems(infos: list[SampleInfo], labels: Labels | None, split: str, trained: bool = False
                     ) -> list[str]:
    """Every problem that makes a split unusable, one line each. trained: the labels are a trained model's, which
    the masks must match (validation), rather than flags still to choose (training)."""
    problems = [i.error for i in infos if i.error]
    ok = [i for i in infos if not i.error]
    for attr, what in (("channels", "{} channels (image + extra bands)"), ("types", "pixel type {}")):
        groups = defaultdict(list)
        for i in ok:
            groups[getattr(i, attr)].append(i)
        if len(groups) > 1:
            common = max(groups, key=lambda k: len(groups[k]))
            for value, members in groups.items():
                if value != common:
                    alpha = " (an alpha channel? save them without it)" if attr == "channels" and value == common + 1 \
                        else ""
                    problems.append(f"{split}: {len(members)} image(s) have {what.format(value)} while "
                                    f"{len(groups[common])} have {common}: {_more([m.image for m in members])}; "
                                    f"convert them so every image has the same layout{alpha}")
    if labels is not None:
        problems += label_problems(ok, labels, split, trained=trained)
    return problems


def smoothed(labels: Labels, infos: list[SampleInfo]) -> bool:
    """Binary masks whose edges were blurred (resized with interpolation, drawn anti-aliased): besides background
    and the class value, many values between them, spread over that range and covering few pixels (edges). Label
    values of more classes (1..20 with 255 as void, say) are few, small and cover much."""
    if not labels.binary:
        return False
    top, counts = labels.values[0], Counter()
    for i in infos:
        counts.update(i.mask_values)
    between = [v for v in counts if 0 < v < top]
    return (len(between) > 10 and counts[0] > 0 and counts[top] > 0 and min(between) < top / 2 < max(between)
            and sum(counts[v] for v in between) < 0.2 * sum(counts.values()))


def label_problems(infos: list[SampleInfo], labels: Labels, split: str, other_fix: str = "",
                   trained: bool = False) -> list[str]:
    """Mask values the labels do not cover (strict labels), and masks that hold no class value at all: always an
    error for training; for other splits when they hold other values instead (0/1 masks against 255, say).
    other_fix: one more way out, appended to the uncovered-values message. trained: see dataset_problems."""
    known = labels.known()
    found = sorted({v for i in infos for v in i.mask_values})
    odd = {i.mask: sorted(v for v in i.mask_values if v not in known) for i in infos}
    odd = {mask: values for mask, values in odd.items() if values}  # file -> its unlisted values
    problems = []
    jpeg = {mask: values for mask, values in odd.items() if Path(mask).suffix.lower() in (".jpg", ".jpeg")}
    if jpeg and labels.strict:
        blurred = sorted({v for values in jpeg.values() for v in values})
        problems.append(f"{split} masks are JPEG files, whose lossy compression turned the label values into "
                        f"{len(blurred)} others ({_more(blurred, 6)}), in {len(jpeg)} file(s), e.g. {next(iter(jpeg))};"
                        " save the masks as PNG or TIFF, which keep exact values")
        odd = {mask: values for mask, values in odd.items() if mask not in jpeg}
    unlisted = sorted({v for values in odd.values() for v in values})
    if unlisted and labels.strict and smoothed(labels, infos):
        top, first = labels.values[0], next(iter(odd))
        problems.append(f"{split} masks are not binary: besides 0 and {top} they hold {len(unlisted)} in-between "
                        f"values ({_more(unlisted)}) in {len(odd)} file(s), e.g. {first}: edges smoothed by resizing "
                        "(use nearest-neighbour) or anti-aliased drawing; threshold them with python "
                        f"dataset_utils/convert_classes_in_masks.py {Path(first).parent} --map "
                        f"\"1-{top // 2}:0 {top // 2 + 1}-{top - 1}:{top}\"")
    elif unlisted and labels.strict:
        suggestion = " ".join(map(str, labels.suggested(found)))
        hint = (" (many values spread over the range: JPEG or anti-aliased masks? save masks as PNG with exact "
                "values)" if len(unlisted) > 10 and unlisted[-1] - unlisted[0] >= 128 else "")
        where = _more([f"{mask} ({_more(values, 4)})" for mask, values in odd.items()], 4)
        if trained:
            return [*problems, f"{split} mask values {_more(unlisted)} are unknown to the model, which was trained "
                    f"with {labels.flag}, in {len(odd)} file(s): {where}; fix those masks, or evaluate without gt/"]
        problems.append(f"{split} masks hold label values {_more(unlisted)} not covered by {labels.flag}{hint}, in "
                        f"{len(odd)} file(s): {where}. If they are classes, pass --class-list \"{suggestion}\"; "
                        f"to leave them out of training pass --ignore-label VALUE; or fix those masks{other_fix}")
    no_class = infos and not any(v in found for v in labels.values)
    if split == "train" and unlisted and labels.strict:
        no_class = False  # the message above gives the --class-list to pass
    if no_class and (split == "train" or (unlisted and not labels.strict)):
        values, others = " ".join(map(str, labels.values)), labels.suggested(found)
        if not others:
            problems.append(f"every {split} mask is all background (values found: {_more(found)}): none marks the "
                            f"class value(s) {values}; check that {split}/gt holds the real masks, not blank ones")
            return problems
        fix = "" if trained else f"pass the right --class-list, e.g. --class-list \"{' '.join(map(str, others))}\", or "
        same = "fix the masks" if split == "train" else f"make the {split} masks use the training masks' label values"
        problems.append(f"no {split} mask holds any of the class values {values} (values found: {_more(found)}); "
                        f"{fix}{same}")
    return problems


def unlisted_note(infos: list[SampleInfo], labels: Labels, split: str) -> str | None:
    """With an explicit --class-list, name the values that count as background."""
    found = {v for i in infos for v in i.mask_values}
    rest = sorted(found - labels.known())
    if rest and not labels.strict:
        return f"note: {split} mask values {_more(rest)} are not in --class-list and count as background"
    return None


def zero_listed_note(labels: Labels, class_pixels: list[int]) -> str | None:
    """Where --class-list lists 0 and no training pixel is left for background, what that means and the fix:
    most who list 0 mean it as the background of their masks, which leaving it out already makes it."""
    if 0 not in labels.values or class_pixels[0]:
        return None
    rest = " ".join(str(v) for v in labels.values if v != 0)
    fix = f"--class-list {rest}" if rest else "list the values of your classes"
    return (f"--class-list {' '.join(map(str, labels.values))} makes value 0 a class of its own (counted in mIoU), "
            f"so no training pixel is background and the model has {labels.out_channels} outputs, one for a class "
            f"that never occurs; if 0 is the background of your masks, leave it out: {fix}")


def constant_channel_note(stats: "ChannelStats", add_dirs: list[str]) -> str | None:
    """Channels that hold one value in every training pixel (an opaque alpha channel, an empty band): they teach
    the model nothing, yet every image it later predicts must bring them."""
    names = [f"image channel {c + 1}" for c in range(len(stats.min) - len(add_dirs))] + [f"band {b}" for b in add_dirs]
    flat = [f"{name} is {lo:g}" for name, lo, hi in zip(names, stats.min, stats.max, strict=True) if lo == hi]
    if not flat:
        return None
    return (f"{', '.join(flat)} in every training pixel (an opaque alpha channel? an empty band?): the model learns "
            "nothing from it, but every image it predicts later must bring it too; save the images without it")


@dataclass
class ChannelStats:
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    class_pixels: list[int]  # pixels per class index over the training masks (ignored pixels left out)


def channel_stats(infos: list[SampleInfo], labels: Labels) -> ChannelStats:
    """Exact per-channel mean/std over every pixel of the training set (float64 sums)."""
    n = sum(i.height * i.width for i in infos)
    sums = np.sum([i.sums for i in infos], axis=0)
    sumsq = np.sum([i.sumsq for i in infos], axis=0)
    mean = sums / n
    std = np.sqrt(np.maximum(sumsq / n - mean * mean, 0.0))
    lut = labels.lut()
    pixels = np.zeros(labels.num_classes, np.int64)
    for i in infos:
        for v, c in i.mask_values.items():
            cls = lut[v] if v < len(lut) else 0
            if cls != IGNORE_INDEX:
                pixels[cls] += c
    return ChannelStats(mean.tolist(), np.where(std > 0, std, 1.0).tolist(),
                        np.min([i.mins for i in infos], axis=0).tolist(),
                        np.max([i.maxs for i in infos], axis=0).tolist(), pixels.tolist())


def fingerprint(samples: list[Sample]) -> str:
    """Changes when any file of the samples is added, removed, resized or rewritten."""
    h = hashlib.sha1()
    for s in samples:
        for p in [s.image, s.mask, *s.bands]:
            if p is not None:
                try:
                    st = p.stat()
                except OSError:  # a link to nothing: reading the file says so
                    st = p.lstat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- checking a whole dataset
@dataclass
class DataSummary:
    """What training needs to know about its data, from one checked pass over every file."""
    channels: int
    dtype: str
    stats: ChannelStats
    sizes: dict[str, list[tuple[int, int]]]  # split -> (height, width) per sample, in sample order
    seconds: float
    types: str = ""  # the files' own pixel types where they differ: "uint16 image + uint8 nir"
    warnings: list[str] = field(default_factory=list)  # what makes the data train yet measure little: said each run

    @property
    def rgb8(self) -> bool:
        return self.channels == 3 and self.dtype == "uint8"


def check_splits(splits: dict[str, list[Sample]], labels: Labels, workers: int) -> DataSummary:
    """Check every file of every split once and measure the training set (exact channel stats, sizes); all
    problems of all splits are raised together."""
    print(f"checking {sum(map(len, splits.values()))} samples ...", flush=True)
    t0 = time.monotonic()
    infos = {name: scan_samples(samples, with_stats=name == "train", workers=workers, desc=f"checking {name}")
             for name, samples in splits.items()}
    train_ok = [i for i in infos["train"] if not i.error]
    # Where train's masks hold values the default --class-list lacks, its message suggests the train masks' values:
    # the other splits are checked against that suggestion, so a wrong --class-list is said once.
    found = labels.suggested({v for i in train_ok for v in i.mask_values})
    unlisted = sorted(set(found) - labels.known())
    others = replace(labels, values=found, flag=f"--class-list {' '.join(map(str, found))}") \
        if labels.strict and unlisted and not smoothed(labels, train_ok) else labels
    problems = [p for name, split_infos in infos.items()
                for p in dataset_problems(split_infos, labels if name == "train" else others, name)]
    layout = Counter((i.channels, i.types) for i in train_ok).most_common(1)[0][0] if train_ok else None
    for name, split_infos in infos.items():
        odd = [i.image for i in split_infos if not i.error and (i.channels, i.types) != layout]
        if layout and name != "train" and odd:
            problems.append(f"{name}: {len(odd)} image(s) differ from the training images ({layout[0]} channels, "
                            f"{layout[1]}): {_more(odd, 4)}; convert them to the training layout")
    raise_problems(problems, "the dataset")
    for name, split_infos in infos.items():
        note = unlisted_note(split_infos, labels, name)
        if note:
            print(note)
    dtype = next(i.dtype for i in train_ok if (i.channels, i.types) == layout)
    return DataSummary(layout[0], dtype, channel_stats(infos["train"], labels),
                       {name: [(i.height, i.width) for i in split_infos] for name, split_infos in infos.items()},
                       round(time.monotonic() - t0, 2), layout[1] if " + " in layout[1] else "",
                       measuring_warnings(infos, labels))


def measuring_warnings(infos: dict[str, list[SampleInfo]], labels: Labels) -> list[str]:
    """Data that trains but whose scores would mean little, or whose masks may not match what the user saw."""
    warnings, train = [], {i.digest: i.image for i in infos["train"] if not i.error}
    for name, split_infos in infos.items():
        ok = [i for i in split_infos if not i.error]
        copies = [(i.image, train[i.digest]) for i in ok if name != "train" and i.digest in train
                  and Path(i.image).resolve() != Path(train[i.digest]).resolve()]  # the same folder: said before
        if copies:
            warnings.append(f"{len(copies)} of the {len(ok)} {name} images are copies of training images (e.g. "
                            f"{copies[0][0]} = {copies[0][1]}): their scores measure memory, not new images; hold "
                            "images out of training for validation")
        as_masks = [i.image for i in ok if i.image_is_mask]
        if len(as_masks) > len(ok) // 2:
            warnings.append(f"{len(as_masks)} {name} images hold exactly their own masks (e.g. {as_masks[0]}): "
                            "masks given as images? images/ must hold the pictures, gt/ the masks")
        if name != "train" and ok and not any(v in labels.values for i in ok for v in i.mask_values):
            warnings.append(f"no {name} mask holds a class ({labels.flag}): every {name} image is all background, "
                            "so its mIoU cannot measure the classes; put images with the classes in it")
        turned = [i.image for i in ok if i.orientation > 1]
        if turned:
            warnings.append(f"{len(turned)} {name} JPEG(s) carry an EXIF orientation (phone pictures, e.g. "
                            f"{turned[0]}): segkit reads them turned upright, as photo viewers show them; their "
                            "masks must be drawn on the upright picture")
    return warnings


def checked_splits(splits: dict[str, list[Sample]], labels: Labels, add_dirs: list[str], cache_dir: Path,
                   workers: int) -> DataSummary:
    """check_splits, remembered in cache_dir under a key of the files' names, sizes and times, the labels and the
    bands: an unchanged dataset is not read again, when an experiment resumes or a new one trains on it."""
    key = fingerprint([s for ss in splits.values() for s in ss]) + json.dumps([labels.to_meta(), add_dirs,
                                                                               CHECK_RULES])
    cache = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"
    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    if saved.get("key") == key:
        data = saved["data"]
        return DataSummary(data["channels"], data["dtype"], ChannelStats(**data["stats"]),
                           {k: [tuple(s) for s in v] for k, v in data["sizes"].items()}, data["seconds"],
                           data["types"], data["warnings"])
    summary = check_splits(splits, labels, workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, json.dumps({"key": key, "data": asdict(summary)}))
    return summary


# ------------------------------------------------------------------------------------------- normalisation
def unit_scaling(stats: ChannelStats) -> tuple[np.ndarray, np.ndarray]:
    """(low, 1 / range) per channel: maps the training set's exact value range onto [0, 1]."""
    lo, hi = np.asarray(stats.min, np.float32), np.asarray(stats.max, np.float32)
    return lo, (1.0 / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def normalization(stats: ChannelStats, unit: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel with normalised = x * scale + shift (zero mean, unit std over the training set),
    for raw pixel values, or (unit=True) for values scaled to [0, 1] by unit_scaling."""
    mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    if not unit:
        return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)
    lo, hi = np.asarray(stats.min, np.float64), np.asarray(stats.max, np.float64)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (span / std).astype(np.float32), ((lo - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------- samples
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
