"""The data checks: every file of every split read once before training or evaluation, every problem found at once
(one line each, with its fix), the training set measured (exact channel statistics, sizes, class pixels), and the
result remembered per dataset so an unchanged dataset is not read again. Never imports torch.
"""
import hashlib
import json
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dataset import Sample, read_parts, stack_parts
from errors import UserError, raise_problems, shown
from fileio import exif_orientation, write_text
from labels import IGNORE_INDEX, ChannelStats, Labels

CHECK_RULES = 5  # raised when check_splits learns new rules: datasets checked by older rules are checked again


def nonfinite_problem(image: np.ndarray, path: Path) -> str | None:
    """NaN or infinite pixels poison normalisation and the loss: a message naming the file, or None."""
    if image.dtype.kind != "f":
        return None
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if not bad:
        return None
    return (f"{path}: {bad} pixel value(s) are NaN or infinite (nodata?); replace them with a number, e.g. with "
            "dataset_utils/filter_dataset.py --nodata nan to find such samples, before training or evaluating")


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
    edges: int = 0  # neighbouring mask pixels (across and down) of different values: the objects' outlines
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
        info.edges = int(np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1]))
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
                                    f"{len(groups[common])} have {common}: {shown([m.image for m in members])}; "
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


@dataclass
class MaskValues:
    """What the masks of one split hold, against the labels: the facts every label rule reads."""
    infos: list[SampleInfo]
    labels: Labels
    split: str
    trained: bool  # the labels are a trained model's, which the masks must match (validation)
    other_fix: str  # one more way out, appended to the uncovered-values message
    found: list[int] = field(init=False)  # every value of every mask
    jpeg: dict[str, list[int]] = field(init=False)  # JPEG mask -> its values a strict list lacks
    odd: dict[str, list[int]] = field(init=False)  # other mask -> its values the labels lack
    unlisted: list[int] = field(init=False)  # the values of `odd`

    def __post_init__(self):
        known = self.labels.known()
        self.found = sorted({v for i in self.infos for v in i.mask_values})
        lacking = {i.mask: sorted(v for v in i.mask_values if v not in known) for i in self.infos}
        lacking = {mask: values for mask, values in lacking.items() if values}
        self.jpeg = {m: v for m, v in lacking.items() if Path(m).suffix.lower() in (".jpg", ".jpeg")} \
            if self.labels.strict else {}
        self.odd = {m: v for m, v in lacking.items() if m not in self.jpeg}
        self.unlisted = sorted({v for values in self.odd.values() for v in values})

    @property
    def uncovered(self) -> bool:
        """Mask values outside a list that must cover them all (the default list, --max-mask-val)."""
        return bool(self.unlisted) and self.labels.strict


def jpeg_masks(m: MaskValues) -> str | None:
    if not m.jpeg:
        return None
    blurred = sorted({v for values in m.jpeg.values() for v in values})
    return (f"{m.split} masks are JPEG files, whose lossy compression turned the label values into {len(blurred)} "
            f"others ({shown(blurred, 6)}), in {len(m.jpeg)} file(s), e.g. {next(iter(m.jpeg))}; save the masks as "
            "PNG or TIFF, which keep exact values")


def blurred_edges(m: MaskValues) -> str | None:
    if not (m.uncovered and smoothed(m.labels, m.infos)):
        return None
    top, first = m.labels.values[0], next(iter(m.odd))
    return (f"{m.split} masks are not binary: besides 0 and {top} they hold {len(m.unlisted)} in-between values "
            f"({shown(m.unlisted)}) in {len(m.odd)} file(s), e.g. {first}: edges smoothed by resizing (use "
            "nearest-neighbour) or anti-aliased drawing; threshold them with python "
            f"dataset_utils/convert_classes_in_masks.py {Path(first).parent} --map "
            f"\"1-{top // 2}:0 {top // 2 + 1}-{top - 1}:{top}\"")


def uncovered_values(m: MaskValues) -> str | None:
    if not m.uncovered or smoothed(m.labels, m.infos):
        return None
    where = shown([f"{mask} ({shown(values, 4)})" for mask, values in m.odd.items()], 4)
    if m.trained:
        return (f"{m.split} mask values {shown(m.unlisted)} are unknown to the model, which was trained with "
                f"{m.labels.flag}, in {len(m.odd)} file(s): {where}; fix those masks, or evaluate without gt/")
    spread = len(m.unlisted) > 10 and m.unlisted[-1] - m.unlisted[0] >= 128
    hint = " (many values spread over the range: JPEG or anti-aliased masks? save masks as PNG with exact values)" \
        if spread else ""
    return (f"{m.split} masks hold label values {shown(m.unlisted)} not covered by {m.labels.flag}{hint}, in "
            f"{len(m.odd)} file(s): {where}. If they are classes, pass --class-list "
            f"\"{' '.join(map(str, m.labels.suggested(m.found)))}\"; to leave them out of training pass "
            f"--ignore-label VALUE; or fix those masks{m.other_fix}")


def no_class_value(m: MaskValues) -> str | None:
    """No mask holds a class: an error for training (where the uncovered-values message does not already give the
    --class-list to pass), for other splits only where they hold other values instead (0/1 against 255)."""
    if not m.infos or any(v in m.found for v in m.labels.values):
        return None
    if not ((m.split == "train" and not m.uncovered) or (m.unlisted and not m.labels.strict)):
        return None
    values, others = " ".join(map(str, m.labels.values)), m.labels.suggested(m.found)
    if not others:
        return (f"every {m.split} mask is all background (values found: {shown(m.found)}): none marks the class "
                f"value(s) {values}; check that {m.split}/gt holds the real masks, not blank ones")
    fix = "" if m.trained else f"pass the right --class-list, e.g. --class-list \"{' '.join(map(str, others))}\", or "
    same = "fix the masks" if m.split == "train" else f"make the {m.split} masks use the training masks' label values"
    return f"no {m.split} mask holds any of the class values {values} (values found: {shown(m.found)}); {fix}{same}"


LABEL_RULES = (jpeg_masks, blurred_edges, uncovered_values, no_class_value)  # each: MaskValues -> problem or None


def label_problems(infos: list[SampleInfo], labels: Labels, split: str, other_fix: str = "",
                   trained: bool = False) -> list[str]:
    """Every label rule's problem with the masks of a split, one line each."""
    values = MaskValues(infos, labels, split, trained, other_fix)
    return [problem for rule in LABEL_RULES if (problem := rule(values))]


def unlisted_note(infos: list[SampleInfo], labels: Labels, split: str) -> str | None:
    """With an explicit --class-list, name the values that count as background."""
    found = {v for i in infos for v in i.mask_values}
    rest = sorted(found - labels.known())
    if rest and not labels.strict:
        return f"note: {split} mask values {shown(rest)} are not in --class-list and count as background"
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
    object_size: float | None = None  # typical foreground object across, in pixels: 4 x area / outline

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
                            f"{layout[1]}): {shown(odd, 4)}; convert them to the training layout")
    raise_problems(problems, "the dataset")
    for name, split_infos in infos.items():
        note = unlisted_note(split_infos, labels, name)
        if note:
            print(note)
    dtype = next(i.dtype for i in train_ok if (i.channels, i.types) == layout)
    return DataSummary(layout[0], dtype, channel_stats(infos["train"], labels),
                       {name: [(i.height, i.width) for i in split_infos] for name, split_infos in infos.items()},
                       round(time.monotonic() - t0, 2), layout[1] if " + " in layout[1] else "",
                       measuring_warnings(infos, labels), object_size(train_ok, labels))


def object_size(infos: list[SampleInfo], labels: Labels) -> float | None:
    """The training masks' typical object across (4 x area / outline: a disc's diameter), None without outlines."""
    edges = sum(i.edges for i in infos)
    area = sum(c for i in infos for v, c in i.mask_values.items() if v in labels.values)
    return round(4 * area / edges, 1) if edges and area else None


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
                           data["types"], data["warnings"], data["object_size"])
    summary = check_splits(splits, labels, workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, json.dumps({"key": key, "data": asdict(summary)}))
    return summary
