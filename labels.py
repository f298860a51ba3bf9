"""Label values and classes, and the training set's normalisation: what checkpoints, losses, metrics and the model
need to know about a dataset, without the checks that learn it (checks.py) or the files it comes from (dataset.py).
numpy only: bundles use it where torch is not installed.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from errors import UserError

IGNORE_INDEX = 255  # class index of ignored pixels (--ignore-label, padding, fill of rotated corners)
MAX_CLASSES = 254


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


@dataclass
class ChannelStats:
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    class_pixels: list[int]  # pixels per class index over the training masks (ignored pixels left out)


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
