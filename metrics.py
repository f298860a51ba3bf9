"""Metrics from confusion matrices accumulated on the device over a whole set (never averaged per batch).

mIoU is the mean IoU over the foreground classes (background, class 0, left out), over classes that occur in the
truth or the prediction; IGNORE_INDEX pixels count nowhere.
"""
import torch

from dataset import IGNORE_INDEX


def predict_classes(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, K, H, W) logits -> (N, H, W) class indices: sigmoid > threshold for one logit, argmax otherwise."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0].float()) > threshold).long()
    return logits.argmax(1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = truth, columns = prediction."""
    target = target.long()
    valid = target != IGNORE_INDEX
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, C) confusion matrix of each image of a batch, in one bincount."""
    n = target.shape[0]
    target = target.long().reshape(n, -1)
    pred = pred.reshape(n, -1)
    valid = target != IGNORE_INDEX
    image = torch.arange(n, device=target.device)[:, None].expand_as(target)
    idx = (image * num_classes + target) * num_classes + pred
    return torch.bincount(idx[valid], minlength=n * num_classes ** 2).reshape(n, num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU of each class from (..., C, C) counts; NaN where a class is absent from truth and prediction."""
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-1) + cm.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_foreground_iou(cm: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """mIoU over foreground classes; `empty` where no foreground class occurs at all (a correct empty image)."""
    fg = iou_per_class(cm)[..., 1:]
    present = ~fg.isnan()
    total = torch.where(present, fg, torch.zeros_like(fg)).sum(-1)
    count = present.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, empty))


def summarize(cm: torch.Tensor) -> dict:
    """Plain-number metrics of a (C, C) confusion matrix: mIoU, per-class IoU / F1 / precision / recall, accuracy."""
    cm = cm.double().cpu()
    tp = cm.diagonal()
    predicted, actual = cm.sum(0), cm.sum(1)
    nan = float("nan")
    precision = [float(t / p) if p > 0 else nan for t, p in zip(tp, predicted, strict=True)]
    recall = [float(t / a) if a > 0 else nan for t, a in zip(tp, actual, strict=True)]
    f1 = [float(2 * t / (p + a)) if p + a > 0 else nan for t, p, a in zip(tp, predicted, actual, strict=True)]
    iou = iou_per_class(cm)
    fg = iou[1:][~iou[1:].isnan()]
    return {
        "miou": float(fg.mean()) if len(fg) else nan,
        "per_class_iou": [float(v) for v in iou],
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else nan,
        "confusion_matrix": cm.long().tolist(),
    }
