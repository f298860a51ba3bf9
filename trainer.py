"""The training loop: fit() over epochs, train_one_epoch(), evaluate() -> confusion matrix; logging, checkpoints and
resume. Knows nothing of file formats: it gets DataLoaders and a model.

Crash safety: at the end of an epoch best.pth (if improved), then last.pth are replaced atomically, then
metrics.csv is rewritten from the history held in last.pth; a run killed at any moment resumes from last.pth and
rewrites metrics.csv from it, so the CSV never holds a row the checkpoint does not.
Reproducibility: each epoch reseeds torch and draws every sample's augmentation seed from (seed, epoch), so a
resumed run sees the same batches and augmentations as an uninterrupted one.
"""
import contextlib
import csv
import io
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import metrics
import visualize
from errors import UserError
from fileio import write_text
from inference import predict
from model import save_checkpoint, unwrap


# -------------------------------------------------------------------------------------------------- samplers
class EpochBatchSampler(Sampler):
    """Shuffled batches of (index, augmentation seed), epoch after epoch from first_epoch on, endlessly.

    Everything is drawn from (seed, epoch) alone, so any epoch can be reproduced on its own. One stream across
    epochs lets the loader's workers prepare the next epoch's first batches while the current one finishes; the
    trainer takes len() batches per epoch. A leftover batch of one sample is dropped (a different sample each
    epoch): batch norm cannot train on it.
    """

    def __init__(self, size: int, batch_size: int, seed: int, first_epoch: int = 1):
        self.size, self.batch_size, self.seed, self.first_epoch = size, batch_size, seed, first_epoch

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size).tolist()
        seeds = rng.integers(0, 2 ** 31, self.size).tolist()
        keys = list(zip(order, seeds, strict=True))
        return [keys[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def __iter__(self):
        for epoch in itertools.count(self.first_epoch):
            yield from self.epoch_batches(epoch)


class SizeGroupedBatchSampler(Sampler):
    """Batches of images that share a size, so whole images can be stacked without resizing."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int):
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault(tuple(s), []).append(i)
        self.batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


# ----------------------------------------------------------------------------------------------------- trainer
@dataclass
class EvalSet:
    name: str
    loader: DataLoader
    size: int


@dataclass
class EvalResult:
    loss: float
    scores: dict
    per_image_iou: torch.Tensor  # (N,) in dataset order
    seconds: float


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    early_stopped: bool = False
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, model, criterion, optimizer, scheduler, scaler, train_loader: DataLoader,
                 eval_sets: list[EvalSet], device: torch.device, amp_dtype: torch.dtype | None, exp_dir: Path,
                 meta: dict, class_names: list[str], epochs: int, seed: int,
                 patience: int = 0, adv_freq: int = 1, val_tile_size: int = 1024,
                 val_batch_size: int = 8, log_worst: int = 4, channels_last: bool = False, min_input: int = 32,
                 resize_to: int | None = None):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.eval_model = unwrap(model)  # not compiled: validation images vary in size, which would recompile
        self.scheduler, self.scaler, self.train_loader = scheduler, scaler, train_loader
        self.eval_sets, self.device, self.amp_dtype = eval_sets, device, amp_dtype
        self.exp_dir, self.meta, self.class_names, self.epochs = exp_dir, meta, class_names, epochs
        self.seed, self.patience = seed, patience
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # steps per epoch
        self.adv_freq = adv_freq
        self.log_worst = log_worst
        self.infer = {"tile_size": val_tile_size, "batch_size": val_batch_size, "min_size": min_input,
                      "autocast": self.autocast, "resize_to": resize_to}
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_classes = len(class_names)
        self.state = TrainState()
        self.writer = None

    # ------------------------------------------------------------------------------------------ state
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def checkpoint(self) -> dict:
        s = self.state
        return {"model": unwrap(self.model).state_dict(), "meta": self.meta, "epoch": s.epoch,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "best_score": s.best_score, "best_epoch": s.best_epoch, "bad_epochs": s.bad_epochs,
                "early_stopped": s.early_stopped, "history": s.history}

    def load(self, ckpt: dict) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(ckpt["epoch"], ckpt["best_score"], ckpt["best_epoch"], ckpt["bad_epochs"],
                                ckpt["early_stopped"], list(ckpt["history"]))
        best = self.exp_dir / "best.pth"
        if best.exists():  # a kill between writing best.pth and last.pth leaves a newer best behind: keep its score
            b = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
            if b["epoch"] > self.state.epoch and b["score"] > self.state.best_score:
                self.state.best_score, self.state.best_epoch = b["score"], b["epoch"]

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainState:
        from torch.utils.tensorboard import SummaryWriter

        s = self.state
        self.write_csv()
        self.writer = SummaryWriter(str(self.exp_dir), purge_step=s.epoch + 1)
        self.train_loader.batch_sampler.first_epoch = s.epoch + 1
        batches = iter(self.train_loader)  # one stream for all epochs: the workers never wait at an epoch's start
        try:
            for epoch in range(s.epoch + 1, self.epochs + 1):
                self.run_epoch(epoch, itertools.islice(batches, len(self.train_loader)))
                if s.early_stopped:
                    print(f"early stop: no improvement for {self.patience} epochs (best {s.best_score:.4f} at "
                          f"epoch {s.best_epoch})")
                    break
        finally:
            self.writer.close()
        return s

    def run_epoch(self, epoch: int, batches) -> None:
        s = self.state
        t0 = time.monotonic()
        train_loss, lr = self.train_one_epoch(epoch, batches)
        if not math.isfinite(train_loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {train_loss}); last.pth keeps epoch "
                            f"{self.state.epoch}: run the same command with --amp off to resume from there, or start "
                            "a new --exp-name with a lower -lr")
        row = {"epoch": epoch, "train_loss": train_loss}
        evaluated = [e for e in self.eval_sets if e.name == "val" or epoch % self.adv_freq == 0
                     or epoch == self.epochs]
        results = {e.name: self.evaluate(e) for e in evaluated}
        main = results.get("val")
        if main is not None:
            row["val_loss"] = main.loss
            row["val_miou"] = main.scores["miou"]
            for name, v in zip(self.class_names, main.scores["per_class_iou"], strict=True):
                row[f"iou_{name}"] = v
        for name, r in results.items():
            if name != "val":
                row[f"{name}_miou"] = r.scores["miou"]
        score = None
        if len(evaluated) == len(self.eval_sets):  # the best model is chosen on epochs that see every val set
            values = [results[e.name].scores["miou"] for e in evaluated]
            values = [0.0 if math.isnan(v) else v for v in values]
            score = sum(e.size * v for e, v in zip(evaluated, values, strict=True)) / sum(e.size for e in evaluated)
            row["score"] = score
        row["lr"] = lr
        row["time_s"] = time.monotonic() - t0
        improved = score is not None and score > s.best_score
        s.epoch = epoch
        s.history.append(row)
        if score is not None:
            if improved:
                s.best_score, s.best_epoch, s.bad_epochs = score, epoch, 0
            else:
                s.bad_epochs += 1
            s.early_stopped = bool(self.patience) and s.bad_epochs >= self.patience
        if self.plateau and score is not None:
            self.scheduler.step(score)
        if improved:
            save_checkpoint(self.exp_dir / "best.pth", {"model": unwrap(self.model).state_dict(),
                                                        "meta": self.meta, "epoch": epoch, "score": score})
        save_checkpoint(self.exp_dir / "last.pth", self.checkpoint())
        self.write_csv()
        self.log_tensorboard(row, epoch, results.get("val"))
        self.print_summary(row, improved)

    def train_one_epoch(self, epoch: int, batches) -> tuple[float, float]:
        """One pass of optimizer steps over `batches` of (images, masks, indices); (mean loss, last lr)."""
        self.model.train()
        torch.manual_seed(self.seed * 1000 + epoch)
        loss_sum = torch.zeros((), device=self.device)
        steps = 0
        bar = tqdm(batches, total=len(self.train_loader), desc=f"epoch {epoch}/{self.epochs}", leave=False,
                   dynamic_ncols=True)
        shown = time.monotonic()
        for images, masks, _ in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            masks = masks.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(images)
            loss = self.criterion(logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            if not self.plateau:
                self.scheduler.step()
            loss_sum += loss.detach()
            steps += 1
            if time.monotonic() - shown > 0.5:  # one host sync per half second, not per step
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
                shown = time.monotonic()
        bar.close()
        return loss_sum.item() / max(steps, 1), self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def evaluate(self, eval_set: EvalSet) -> EvalResult:
        t0 = time.monotonic()
        self.eval_model.eval()
        cm = torch.zeros((self.num_classes, self.num_classes), dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        ious = torch.zeros(eval_set.size, dtype=torch.float64, device=self.device)
        for images, masks, index in eval_set.loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            masks = masks.to(self.device, non_blocking=True)
            logits = predict(self.eval_model, images, **self.infer)
            loss_sum += self.criterion(logits, masks) * len(images)
            pred = metrics.predict_classes(logits)
            cm += metrics.confusion_matrix(pred, masks, self.num_classes)
            ious[index.to(self.device)] = metrics.mean_foreground_iou(
                metrics.per_image_confusion(pred, masks, self.num_classes))
        return EvalResult(loss_sum.item() / max(eval_set.size, 1), metrics.summarize(cm), ious.cpu(),
                          time.monotonic() - t0)

    # ------------------------------------------------------------------------------------------ output
    def write_csv(self) -> None:
        """metrics.csv from the history: one row per completed epoch, rewritten atomically."""
        columns = []
        for row in self.state.history:
            columns += [k for k in row if k not in columns]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in self.state.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.state.history or not (self.exp_dir / "metrics.csv").exists():
            write_text(self.exp_dir / "metrics.csv", out.getvalue())

    def log_tensorboard(self, row: dict, epoch: int, val: EvalResult | None) -> None:
        w = self.writer
        for key, value in row.items():
            if key == "epoch" or value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            group = "iou" if key.startswith("iou_") else "loss" if key.endswith("loss") else "metrics"
            w.add_scalar(f"{group}/{key}", value, epoch)
        if val is not None and self.log_worst:
            w.add_image("val/worst", self.worst_grid(val), epoch, dataformats="HWC")
        w.flush()

    @torch.no_grad()
    def worst_grid(self, val: EvalResult) -> np.ndarray:
        """Image | truth | prediction for the val samples with the lowest IoU."""
        dataset = self.eval_sets[0].loader.dataset
        rows = []
        for index in torch.argsort(val.per_image_iou)[: self.log_worst].tolist():
            image, mask, _ = dataset[index]
            logits = predict(self.eval_model, image[None].to(self.device), **self.infer)
            pred = metrics.predict_classes(logits)[0].cpu().numpy().astype(np.uint8)
            raw, _ = dataset.load(index)
            truth = mask.numpy()
            rows.append(visualize.panel(
                [visualize.to_rgb8(raw), visualize.colorize(truth, self.num_classes),
                 visualize.colorize(pred, self.num_classes)],
                [dataset.samples[index].stem[:24], "truth", f"pred IoU {val.per_image_iou[index]:.3f}"]))
        return visualize.stack_rows(rows)

    def print_summary(self, row: dict, improved: bool) -> None:
        s = self.state
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"train_loss {row['train_loss']:.4f}"]
        if "val_loss" in row:
            parts += [f"val_loss {row['val_loss']:.4f}", f"val_mIoU {row['val_miou']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in row.items() if k.endswith("_miou") and k != "val_miou"]
        if s.best_epoch:
            parts.append(f"best {s.best_score:.4f} @{s.best_epoch}" + (" *" if improved else ""))
        parts += [f"lr {row['lr']:.2e}", f"{row['time_s']:.1f}s"]
        print("  ".join(parts), flush=True)
