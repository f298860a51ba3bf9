"""Loss registry over SMP's losses. Every loss takes (logits, target class indices), skips IGNORE_INDEX pixels, and
is computed in float32 so Dice sums cannot overflow under AMP."""
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from dataset import IGNORE_INDEX
from errors import UserError


class MaskedBCE(nn.Module):
    """Binary cross-entropy averaged over the pixels that are not ignored."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != IGNORE_INDEX).float()
        pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        loss = F.binary_cross_entropy_with_logits(logits, (target == 1).float(), reduction="none",
                                                  pos_weight=pos_weight)
        return (loss * valid).sum() / valid.sum().clamp_min(1)


def _smp(cls, **kw):
    def make(mode: str, class_weights: list[float] | None, pos_weight: float | None) -> nn.Module:
        return cls(mode=mode, ignore_index=IGNORE_INDEX, **kw)
    return make


def _bce(mode: str, class_weights: list[float] | None, pos_weight: float | None) -> nn.Module:
    if mode != "binary":
        raise UserError("--loss bce is for binary models (one class value); use ce or dice+ce for multi-class")
    return MaskedBCE(pos_weight)


def _ce(mode: str, class_weights: list[float] | None, pos_weight: float | None) -> nn.Module:
    if mode == "binary":
        raise UserError("--loss ce is for multi-class models; use bce or dice+bce for a binary model")
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)


LOSSES = {
    "dice": _smp(smp_losses.DiceLoss),
    "jaccard": _smp(smp_losses.JaccardLoss),
    "bce": _bce,
    "ce": _ce,
    "focal": _smp(smp_losses.FocalLoss),
    "lovasz": _smp(smp_losses.LovaszLoss),
    "tversky": _smp(smp_losses.TverskyLoss, alpha=0.3, beta=0.7),  # recall-leaning: misses cost more
}
COMBOS = {"dice+bce": ("dice", "bce"), "dice+ce": ("dice", "ce")}
LOSS_NAMES = list(LOSSES) + list(COMBOS)


class SegmentationLoss(nn.Module):
    """Sum of the named losses on float32 logits; binary logits (N, 1, H, W) meet targets (N, H, W)."""

    def __init__(self, name: str, binary: bool, class_weights: list[float] | None = None,
                 pos_weight: float | None = None):
        super().__init__()
        if name not in LOSS_NAMES:
            raise UserError(f"unknown --loss {name}; choose one of: {', '.join(LOSS_NAMES)}")
        mode = "binary" if binary else "multiclass"
        self.binary = binary
        self.parts = nn.ModuleList(LOSSES[n](mode, class_weights, pos_weight) for n in COMBOS.get(name, (name,)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.long()
        if self.binary:
            target = target.unsqueeze(1)
        return sum(part(logits, target) for part in self.parts)
