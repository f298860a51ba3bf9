"""Optimizers and learning-rate schedules by name: the registries behind --optimizer and --scheduler.

torch is imported when one is made, not when the names are read: train.py --help lists them without loading torch.
"""
import math


def _optim():
    import torch

    return torch.optim


def _lion(params, lr: float, wd: float):
    from timm.optim import Lion  # timm comes with segmentation-models-pytorch

    return Lion(params, lr=lr, weight_decay=wd)


OPTIMIZERS = {
    "adamw": lambda params, lr, wd: _optim().AdamW(params, lr=lr, weight_decay=wd),
    "adam": lambda params, lr, wd: _optim().Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: _optim().SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
    # Lion's sign updates are larger than Adam's: it wants a learning rate 3-10x smaller (1e-4 for AdamW's 1e-3) and
    # a weight decay 3-10x larger.
    "lion": _lion,
}
# Learning-rate factor after warm-up as a function of the run's progress 0..1. Cosine is the default: it spends
# the middle of the run at a useful rate and ends near zero, which settles the weights without a tuned step
# schedule. "plateau" instead halves the rate when the val score stalls for 5 epochs (stepped per scored epoch).
SCHEDULES = {
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "poly": lambda progress: (1 - progress) ** 0.9,
    "none": lambda progress: 1.0,
    "plateau": None,
}


def make_optimizer(name: str, model, lr: float, weight_decay: float):
    return OPTIMIZERS[name](model.parameters(), lr, weight_decay)


class StepSchedule:
    """The learning-rate factor at a step: linear warm-up, then the schedule over the steps to `total`. `total` may
    be moved while training (a time budget re-plans it at each epoch's end); the scheduler's state_dict keeps it."""

    def __init__(self, name: str, total: int, warmup: int):
        self.name, self.total, self.warmup = name, total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return SCHEDULES[self.name](min(1.0, (step - self.warmup) / max(1, self.total - self.warmup)))


def make_scheduler(name: str, optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float):
    """Per-step linear warm-up (at most a tenth of the run) then the schedule; or per-epoch ReduceLROnPlateau."""
    schedulers = _optim().lr_scheduler
    if name == "plateau":
        return schedulers.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5)
    total = epochs * steps_per_epoch
    return schedulers.LambdaLR(optimizer, StepSchedule(name, total, int(min(warmup_epochs * steps_per_epoch,
                                                                            total // 10))))
