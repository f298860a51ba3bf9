"""Metrics from confusion matrices accumulated on the device over a whole set (never averaged per batch), shared by
training's validation and validate.py.

mIoU is the mean IoU over the foreground classes (background, class 0, left out), over classes that occur in the
truth or the prediction; IGNORE_INDEX pixels count nowhere.
"""
import torch

from labels import IGNORE_INDEX


def predict_classes(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, K, H, W) logits -> (N, H, W) class indices: sigmoid > threshold for one logit, argmax otherwise."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0].float()) > threshold).long()
    return logits.argmax(1)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, C) confusion matrix of each image of a batch (rows truth, columns prediction), in one scatter-add.

    Ignored pixels count into a spare bin rather than being masked out, and no bincount is used: both would make a
    GPU wait for the host every batch.
    """
    n, c = target.shape[0], num_classes
    target = target.long().reshape(n, -1)
    idx = (torch.arange(n, device=target.device)[:, None] * c + target) * c + pred.long().reshape(n, -1)
    idx = torch.where(target == IGNORE_INDEX, n * c * c, idx).reshape(-1)
    counts = torch.zeros(n * c * c + 1, dtype=torch.long, device=target.device)
    counts.scatter_add_(0, idx, torch.ones((), dtype=torch.long, device=target.device).expand_as(idx))
    return counts[:-1].reshape(n, c, c)


def class_scores(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU, precision, recall and F1 of each class from (..., C, C) counts; NaN where a score is undefined (the
    class absent from truth and prediction)."""
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    predicted, actual = cm.sum(-2), cm.sum(-1)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))

    return {"iou": ratio(tp, predicted + actual - tp), "precision": ratio(tp, predicted),
            "recall": ratio(tp, actual), "f1": ratio(2 * tp, predicted + actual)}


def mean_foreground_iou(cm: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """mIoU over the foreground classes present, for (..., C, C) counts; `empty` where none is present (1: an image
    without foreground, predicted without foreground, is right)."""
    fg = class_scores(cm)["iou"][..., 1:]
    present = ~fg.isnan()
    total = torch.where(present, fg, torch.zeros_like(fg)).sum(-1)
    count = present.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, empty))


def summarize(cm: torch.Tensor) -> dict:
    """Plain-number metrics of a (C, C) confusion matrix: mIoU, per-class IoU / F1 / precision / recall, accuracy."""
    cm = cm.double().cpu()
    scores = class_scores(cm)
    total = cm.sum()
    return {
        "miou": float(mean_foreground_iou(cm, empty=float("nan"))),
        "per_class_iou": scores["iou"].tolist(),
        "f1": scores["f1"].tolist(),
        "precision": scores["precision"].tolist(),
        "recall": scores["recall"].tolist(),
        "accuracy": float(cm.diagonal().sum() / total) if total > 0 else float("nan"),
        "confusion_matrix": cm.long().tolist(),
    }


class ConfusionMatrix:
    """The one meter of training's validation and validate.py: counts over a whole set on the device, per-image
    counts on the way, and a sum across the processes of a torchrun job."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch of (N, H, W) predicted and true class indices; returns the (N, C, C) per-image counts."""
        per_image = per_image_confusion(pred, target, self.num_classes)
        self.mat += per_image.sum(0)
        return per_image

    def all_reduce(self) -> None:
        """Sum the counts of every process (a no-op outside torchrun)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self) -> dict:
        return summarize(self.mat)
