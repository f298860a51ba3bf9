"""Loss registry over SMP's losses. Every loss takes (logits, target class indices), skips IGNORE_INDEX pixels, and
is computed in float32 so Dice sums cannot overflow under AMP.

torch and SMP are imported when a loss is made, not when the names are read: train.py --help lists them fast.
"""
from collections.abc import Callable

import numpy as np

from errors import UserError
from labels import IGNORE_INDEX, Labels


def _smp(name: str, **kw):
    def make(mode: str, class_weights: list[float] | None, pos_weight: float | None):
        from segmentation_models_pytorch import losses

        return getattr(losses, name)(mode=mode, ignore_index=IGNORE_INDEX, **kw)
    return make


def _bce(mode: str, class_weights: list[float] | None, pos_weight: float | None):
    """Binary cross-entropy averaged over the pixels that are not ignored."""
    import torch.nn.functional as F

    if mode != "binary":
        raise UserError("--loss bce is for binary models (one class value); use ce or dice+ce for multi-class")

    weights = {}  # device -> tensor, made once rather than copied to the device every step

    def bce(logits, target):
        valid = (target != IGNORE_INDEX).float()
        if pos_weight is not None and logits.device not in weights:
            weights[logits.device] = logits.new_tensor(pos_weight)
        loss = F.binary_cross_entropy_with_logits(logits, (target == 1).float(), reduction="none",
                                                  pos_weight=weights.get(logits.device))
        return (loss * valid).sum() / valid.sum().clamp_min(1)
    return bce


def _ce(mode: str, class_weights: list[float] | None, pos_weight: float | None):
    import torch.nn.functional as F

    if mode == "binary":
        raise UserError("--loss ce is for multi-class models; use bce or dice+bce for a binary model")

    weights = {}  # device -> tensor, made once rather than copied to the device every step

    def ce(logits, target):
        if class_weights is not None and logits.device not in weights:
            weights[logits.device] = logits.new_tensor(class_weights)
        return F.cross_entropy(logits, target, weight=weights.get(logits.device), ignore_index=IGNORE_INDEX)
    return ce


LOSSES = {
    "dice": _smp("DiceLoss"),
    "jaccard": _smp("JaccardLoss"),
    "bce": _bce,
    "ce": _ce,
    "focal": _smp("FocalLoss"),
    "lovasz": _smp("LovaszLoss"),
    "tversky": _smp("TverskyLoss", alpha=0.3, beta=0.7),  # recall-leaning: misses cost more
}
COMBOS = {"dice+bce": ("dice", "bce"), "dice+ce": ("dice", "ce")}
LOSS_NAMES = list(LOSSES) + list(COMBOS)


class SegmentationLoss:
    """Sum of the named losses on float32 logits; binary logits (N, 1, H, W) meet targets (N, H, W)."""

    def __init__(self, name: str, binary: bool, class_weights: list[float] | None = None,
                 pos_weight: float | None = None):
        if name not in LOSS_NAMES:
            raise UserError(f"unknown --loss {name}; choose one of: {', '.join(LOSS_NAMES)}")
        mode = "binary" if binary else "multiclass"
        self.binary = binary
        self.parts: list[Callable] = [LOSSES[n](mode, class_weights, pos_weight) for n in COMBOS.get(name, (name,))]

    def __call__(self, logits, target):
        logits = logits.float()
        target = target.long()
        if self.binary:
            target = target.unsqueeze(1)
        return sum(part(logits, target) for part in self.parts)


def loss_weights(class_weights: str | None, pos_weight: str | None, labels: Labels, class_pixels: list[int]
                 ) -> tuple[list[float] | None, float | None]:
    """--class-weights ("w0 w1 ...", or auto: median frequency over the training masks, clipped to 0.1..10) and
    --pos-weight (a number, or auto: background / foreground pixels, at most 10)."""
    pixels = np.asarray(class_pixels, np.float64)
    weights = pos = None
    if class_weights == "auto":
        freq = pixels / max(pixels.sum(), 1)
        weights = np.clip(np.median(freq[freq > 0]) / np.maximum(freq, 1e-12), 0.1, 10).tolist()
    elif class_weights:
        try:
            weights = [float(v) for v in class_weights.replace(",", " ").split()]
        except ValueError:
            raise UserError(f"--class-weights '{class_weights}' must be numbers or auto") from None
        if len(weights) != labels.num_classes:
            raise UserError(f"--class-weights has {len(weights)} values; give one per class including "
                            f"background ({labels.num_classes}: {', '.join(labels.names)})")
        if not all(np.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise UserError(f"--class-weights '{class_weights}' must be non-negative numbers, not all zero")
    if pos_weight == "auto":
        pos = float(min(10.0, pixels[0] / max(pixels[1:].sum(), 1)))
    elif pos_weight is not None:
        try:
            pos = float(pos_weight)
        except ValueError:
            raise UserError(f"--pos-weight '{pos_weight}' must be a number or auto") from None
        if not (np.isfinite(pos) and pos > 0):
            raise UserError(f"--pos-weight {pos_weight} must be a positive number")
    return weights, pos
