"""The training loop: fit() over epochs, train_one_epoch(), evaluate() into a confusion matrix, and resume. Knows
nothing of file formats: it gets loaders, a model and its metadata, and hands each epoch's end to the checkpoint
policy (checkpoint.CheckpointSaver: best.pth, last.pth, metrics.csv, written in the background) and its log
(tblog.TensorBoardLog). Ctrl-C and errors wait for the write in flight.
Reproducibility: each epoch reseeds torch and draws every sample's augmentation seed from (seed, epoch), so a
resumed run sees the same batches and augmentations as an uninterrupted one.
Under torchrun, every process trains its share of each batch and evaluates its share of the val batches; the
confusion matrices are summed, so every process takes the same decisions, and process 0 alone writes and prints.
"""
import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import checkpoint
import metrics
from budget import Clock, as_time
from checkpoint import Checkpoint, CheckpointSaver, ModelMeta
from cli import progress
from errors import UserError
from inference import Predictor, TorchRunner
from loaders import epoch_stream
from losses import SegmentationLoss, loss_weights
from model import Normalize, Segmenter, min_input_size, unwrap
from optim import make_optimizer, make_scheduler
from plan import validation_epochs
from tblog import TensorBoardLog


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the loaders and the metadata."""
    exp_dir: Path
    device: torch.device
    epochs: int
    amp: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    seed: int = 42
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    loss: str = "dice"
    class_weights: str | None = None
    pos_weight: str | None = None
    accum_steps: int = 1  # batches whose gradients add up to one optimizer step
    patience: int = 0
    adv_freq: int = 1
    val_batch_size: int = 8
    log_worst: int = 4
    rank: int = 0  # this process and the number of processes under torchrun
    world: int = 1
    clock: Clock | None = None  # a --budget run's time: it trains until the planned steps are done or time is up
    validations: int | None = None  # a --budget run validates this many epochs (plan.validation_epochs), else all


@dataclass
class EvalSet:
    name: str
    loader: DataLoader  # endless (SizeGroupedBatchSampler with repeat): len(loader) batches per epoch
    size: int  # samples in the whole set, over every process


@dataclass
class EvalResult:
    loss: float
    scores: dict
    per_image_iou: torch.Tensor  # (N,) in dataset order
    seconds: float
    worst: list = field(default_factory=list)  # WorstImages.lowest() of the images this process scored


class WorstImages:
    """The k lowest-IoU images of an evaluation with their predicted classes, picked on the device as the batches
    go by, so their picture needs no second reading or forward pass. Each batch leaves its k lowest; the candidates
    are narrowed down to k (one wait for the device) whenever they outgrow PRUNE_BYTES."""

    PRUNE_BYTES = 64 * 2 ** 20

    def __init__(self, k: int):
        self.k, self.kept, self.pending, self.pending_bytes = k, [], [], 0

    def add(self, iou: torch.Tensor, index: torch.Tensor, classes: torch.Tensor) -> None:
        """A batch's per-image IoU (N,), dataset indices (N,) and predicted classes (N, H, W), all on the device."""
        if self.k == 0:
            return
        low = torch.topk(iou, min(self.k, len(iou)), largest=False).indices
        self.pending.append((iou[low], index[low], classes[low].to(torch.uint8)))
        self.pending_bytes += self.pending[-1][2].numel()
        if self.pending_bytes > self.PRUNE_BYTES:
            self.kept, self.pending, self.pending_bytes = self.lowest(), [], 0

    def lowest(self) -> list[tuple[float, int, torch.Tensor]]:
        """(IoU, dataset index, classes (H, W)) of the k lowest so far, lowest first (ties: lower index)."""
        items = self.kept + [t for ious, indices, classes in self.pending
                             for t in zip(ious.tolist(), indices.tolist(), classes, strict=True)]
        return sorted(items, key=lambda t: t[:2])[: self.k]


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    early_stopped: bool = False
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0  # a --budget run's time spent, by every process that ran it

    def record(self, epoch: int, row: dict, score: float | None, patience: int) -> bool:
        """Record the epoch; True when it is the best so far."""
        self.epoch = epoch
        self.history.append(row)
        improved = score is not None and score > self.best_score
        if score is not None:
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            else:
                self.bad_epochs += 1
            self.early_stopped = bool(patience) and self.bad_epochs >= patience
        return improved


class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_loader: DataLoader, eval_sets: list[EvalSet],
                 meta: ModelMeta):
        self.cfg, self.meta, self.train_loader, self.eval_sets = cfg, meta, train_loader, eval_sets
        weights, pos = loss_weights(cfg.class_weights, cfg.pos_weight, meta.labels, meta.stats.class_pixels)
        self.criterion = SegmentationLoss(cfg.loss, meta.binary, weights, pos)
        net = unwrap(model)
        self.optimizer = make_optimizer(cfg.optimizer, net, cfg.learning_rate, cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
        self.scheduler = make_scheduler(cfg.scheduler, self.optimizer, cfg.epochs, self.steps_per_epoch,
                                        cfg.warmup_epochs)
        self.plateau = cfg.scheduler == "plateau"  # steps once per scored epoch, not per batch
        self.scaler = torch.amp.GradScaler(cfg.device.type) if cfg.amp == torch.float16 else None
        # Training batches come as stored (uint8) or scaled to [0, 1] (other types, for the augmentations).
        self.normalize = Normalize(meta.stats, unit=meta.dtype != "uint8").to(cfg.device)
        self.model = torch.compile(model) if cfg.compile else model
        # Validation goes through the inference path, on the plain network: image sizes vary, which would recompile.
        runner = TorchRunner(Segmenter(net, meta.stats).to(cfg.device), cfg.device, cfg.amp, cfg.channels_last)
        self.predictor = Predictor.create(meta, runner, tile_size=meta.val_tile_size, batch_size=cfg.val_batch_size,
                                          threshold=0.5, min_size=min_input_size(meta.arch))
        self.main = cfg.rank == 0
        self.state = TrainState()
        self.log = TensorBoardLog(cfg.exp_dir, meta.labels.num_classes, eval_sets and eval_sets[0].loader.dataset)
        self.saver: CheckpointSaver | None = None  # process 0's, while fit() runs

    # ------------------------------------------------------------------------------------------ state
    def autocast(self):
        if self.cfg.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.cfg.device.type, dtype=self.cfg.amp)

    def training_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "state": asdict(self.state)}

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from a last.pth: weights, optimizer, schedule, scaler and the trainer's own state."""
        unwrap(self.model).load_state_dict(ckpt.model)
        training = ckpt.training
        self.optimizer.load_state_dict(training["optimizer"])
        planned = dict(vars(self.horizon)) if not self.plateau else {}  # this command's -e, not the saved one's
        self.scheduler.load_state_dict(training["scheduler"])
        if planned and self.cfg.clock is None:
            vars(self.horizon).update(planned)
        if self.scaler is not None and training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])
        self.state = TrainState(**{**training["state"], "history": list(training["state"]["history"])})
        if self.state.early_stopped:  # more epochs asked for after an early stop: patience starts afresh
            self.state.early_stopped, self.state.bad_epochs = False, 0
        s = self.state
        s.best_score, s.best_epoch = checkpoint.best_to_keep(self.cfg.exp_dir / "best.pth", s.epoch, s.best_score,
                                                             s.best_epoch)
        if self.cfg.clock is not None and s.elapsed_s:  # a larger budget: more steps, at the pace so far
            done = self.scheduler.last_epoch
            self.horizon.total = max(self.horizon.total, int(done * self.cfg.clock.seconds / s.elapsed_s))

    # ------------------------------------------------------------------------------------------ loop
    @property
    def saved_epoch(self) -> int:
        """The newest epoch handed to the checkpoint writer: what last.pth holds."""
        return self.saver.saved_epoch if self.saver is not None else self.state.epoch

    def fit(self) -> TrainState:
        s = self.state
        if self.main:
            self.saver = CheckpointSaver(self.cfg.exp_dir, self.meta, lambda: unwrap(self.model).state_dict(),
                                         self.training_state, self.log.log)
            self.saver.start(s.history, s.epoch, lambda: self.log.open(s.epoch + 1))  # slow to import: not on the way
        self.train_loader.batch_sampler.first_epoch = s.epoch + 1
        train_epochs = epoch_stream(self.train_loader)  # one stream for all epochs: workers never wait at a start
        eval_epochs = {e.name: epoch_stream(e.loader) for e in self.eval_sets}
        val = None
        try:
            for epoch in itertools.count(s.epoch + 1):
                if self.ended(epoch):
                    break
                val = self.run_epoch(epoch, next(train_epochs), eval_epochs)
                if s.early_stopped:
                    break
            if self.main:
                self.saver.flush(s.history, lambda: self.worst(val))
        finally:
            if self.saver is not None:
                self.saver.close()
            self.log.close()
        if s.early_stopped and self.main:
            print(f"early stop: no improvement for {self.cfg.patience} epochs (best {s.best_score:.4f} at epoch "
                  f"{s.best_epoch})")
        return s

    def ended(self, epoch: int) -> bool:
        """Epochs done, or a budget run's planned steps (or, alone, its time)."""
        if self.cfg.clock is None:
            return epoch > self.cfg.epochs
        return self.scheduler.last_epoch >= self.horizon.total or (self.cfg.world == 1 and
                                                                   self.cfg.clock.train_left() <= 0)

    def validates(self, epoch: int) -> bool:
        """Every epoch validates, but in a budget run those its plan spreads (and the last)."""
        return self.cfg.validations is None or self.ended(epoch + 1) or \
            epoch in validation_epochs(self.cfg.epochs, self.cfg.validations)

    def replan(self, epoch: int, train_s: float, steps: int, val_s: float | None) -> None:
        """A budget run, at an epoch's end: the steps that fit in the time left, from this epoch's timings, become
        the schedule's end, so the learning rate decays to the budget's end (process 0 decides, for all)."""
        clock, done = self.cfg.clock, self.scheduler.last_epoch
        clock.timed(train_s, steps, val_s)
        due = sum(e > epoch for e in validation_epochs(self.cfg.epochs, self.cfg.validations or self.cfg.epochs))
        total = torch.tensor([done + clock.steps_left(due)], device=self.cfg.device)
        if self.cfg.world > 1:
            torch.distributed.broadcast(total, 0)
        self.horizon.total = int(total.item())
        per_epoch = len(self.train_loader) / self.cfg.accum_steps
        self.cfg.epochs = epoch + math.ceil((self.horizon.total - done) / per_epoch)  # for the console
        self.state.elapsed_s = clock.spent()

    def worst(self, val: EvalResult | None) -> list | None:
        return worst_predictions(val, self.cfg.log_worst, self.predictor, self.eval_sets[0].loader.dataset)

    @property
    def horizon(self):
        """The step schedule whose end a budget run moves (optim.StepSchedule)."""
        return self.scheduler.lr_lambdas[0]

    def run_epoch(self, epoch: int, batches, eval_epochs: dict) -> EvalResult | None:
        t0 = time.monotonic()
        train_loss, lr = self.train_one_epoch(epoch, batches)
        train_s = time.monotonic() - t0
        if not math.isfinite(train_loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {train_loss}); last.pth keeps epoch "
                            f"{self.saved_epoch}: run the same command with --amp off to resume from there, or start "
                            "a new --exp-name with a lower -lr")
        due = [e for e in self.eval_sets if e.name == "val" or epoch % self.cfg.adv_freq == 0
               or epoch == self.cfg.epochs] if self.validates(epoch) else []
        self.sync_buffers()
        results = {e.name: self.evaluate(e, next(eval_epochs[e.name])) for e in due}
        row, score = epoch_row(self.meta, self.eval_sets, epoch, train_loss, lr, results,
                               len(due) == len(self.eval_sets))
        row["time_s"] = time.monotonic() - t0
        if self.cfg.clock is not None:
            self.replan(epoch, train_s, self.epoch_steps, sum(r.seconds for r in results.values()) or None)
        improved = self.state.record(epoch, row, score, self.cfg.patience)
        self.share_stop()
        if self.plateau and score is not None:
            self.scheduler.step(score)
        if self.main:
            left = f"  {as_time(self.cfg.clock.left())} left" if self.cfg.clock is not None else ""
            print(summary(row, self.state, self.cfg.epochs, improved) + left, flush=True)
            self.saver.epoch_end(self.state.history, improved, lambda: self.worst(results.get("val")))
        return results.get("val")

    def train_one_epoch(self, epoch: int, batches) -> tuple[float, float]:
        """One pass of optimizer steps over `batches`; (mean loss over all processes, last lr)."""
        self.model.train()
        torch.manual_seed(self.cfg.seed * 1000 + epoch)
        loss_sum = torch.zeros((), device=self.cfg.device)
        steps = len(self.train_loader)
        bar = progress(batches, total=steps, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                       disable=not self.main)
        shown = time.monotonic()
        k = self.cfg.accum_steps
        self.epoch_steps = 0
        for i, batch in enumerate(bar):
            images = self.normalize(self.to_device(batch["image"]))
            masks = batch["mask"].to(self.cfg.device, non_blocking=True)
            group = min(k, steps - i // k * k)  # batches in this optimizer step (the epoch's last may be short)
            last = (i + 1) % k == 0 or i + 1 == steps
            with self.no_sync(not last):
                with self.autocast():
                    logits = self.model(images)
                loss = self.criterion(logits, masks)
                self.backward(loss / group)
            if last:
                self.step()
                self.epoch_steps += 1
            loss_sum += loss.detach()
            if self.main and time.monotonic() - shown > 0.5:  # one host sync per half second, not per step
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.4f}")
                shown = time.monotonic()
            if last and self.cfg.clock is not None and self.ended(epoch):  # the plan's last step, or time is up
                break
        bar.close()
        self.all_reduce(loss_sum, average=True)
        return loss_sum.item() / max(i + 1, 1), self.optimizer.param_groups[0]["lr"]

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) host batch -> (N, C, H, W) on the device; channels last makes it a view, not a copy."""
        x = images.to(self.cfg.device, non_blocking=True).permute(0, 3, 1, 2)
        return x if self.cfg.channels_last else x.contiguous()

    def no_sync(self, skip: bool):
        """Under DistributedDataParallel, gradients of the batches inside an accumulation step are not exchanged."""
        return self.model.no_sync() if skip and hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.plateau:
            self.scheduler.step()

    @torch.no_grad()
    def evaluate(self, eval_set: EvalSet, batches) -> EvalResult:
        """Loss, metrics and per-image IoU of one val set (this process's share, summed over all processes)."""
        t0 = time.monotonic()
        self.predictor.runner.model.eval()
        device, num_classes = self.cfg.device, self.meta.labels.num_classes
        cm = metrics.ConfusionMatrix(num_classes, device)
        loss_sum = torch.zeros((), device=device)
        ious = torch.zeros(eval_set.size, dtype=torch.float64, device=device)
        worst = WorstImages(self.cfg.log_worst if self.main and eval_set.name == "val" else 0)
        for batch in batches:
            logits = self.predictor.logits(self.predictor.runner.asarray(batch["image"]))
            masks = batch["mask"].to(device, non_blocking=True)
            index = batch["index"].to(device, non_blocking=True)
            loss_sum += self.criterion(logits, masks) * len(masks)
            classes = metrics.predict_classes(logits)
            iou = metrics.mean_foreground_iou(cm.update(classes, masks))
            ious[index] = iou
            worst.add(iou, index, classes)
        cm.all_reduce()
        self.all_reduce(loss_sum)
        self.all_reduce(ious)  # each image was scored by exactly one process
        return EvalResult(loss_sum.item() / max(eval_set.size, 1), cm.compute(), ious.cpu(), time.monotonic() - t0,
                          worst.lowest())

    def sync_buffers(self) -> None:
        """Under torchrun, every process evaluates with process 0's batch-norm statistics: those it saves."""
        if self.cfg.world > 1:
            for buffer in unwrap(self.model).buffers():
                torch.distributed.broadcast(buffer, 0)

    def share_stop(self) -> None:
        """Every process stops early exactly when process 0 does, whatever rounding its own scores saw."""
        if self.cfg.world > 1:
            flag = torch.tensor([self.state.early_stopped], dtype=torch.uint8, device=self.cfg.device)
            torch.distributed.broadcast(flag, 0)
            self.state.early_stopped = bool(flag.item())

    def all_reduce(self, t: torch.Tensor, average: bool = False) -> None:
        if self.cfg.world > 1:
            torch.distributed.all_reduce(t)
            if average:
                t /= self.cfg.world

    # ------------------------------------------------------------------------------------------ bookkeeping


@torch.no_grad()
def worst_predictions(val: EvalResult | None, k: int, predictor, dataset) -> list[tuple[int, float, np.ndarray]] | None:
    """(index, IoU, predicted classes) of the k val samples with the lowest IoU over every process: the picture is
    drawn later. This process kept its own worst from the evaluation; under torchrun, those another process scored
    are predicted again. None without a val result or k."""
    if val is None or not k:
        return None
    captured = {index: classes for _, index, classes in val.worst}
    ious = val.per_image_iou.numpy()
    elsewhere = np.ones(len(ious), dtype=bool)
    elsewhere[list(captured)] = False
    out = []
    for index in np.lexsort((elsewhere, ious))[:k].tolist():  # ties: captured first
        classes = captured.get(index)
        if classes is None:
            image = dataset[index]["image"]
            classes = metrics.predict_classes(predictor.logits(predictor.runner.asarray(image[None])))[0]
        out.append((index, float(ious[index]), classes.byte().cpu().numpy()))
    return out


def epoch_row(meta: ModelMeta, eval_sets: list[EvalSet], epoch: int, train_loss: float, lr: float, results: dict,
              every_set: bool) -> tuple[dict, float | None]:
    """The epoch's metrics.csv row, and its selection score: the size-weighted mean mIoU of the val sets, on epochs
    that evaluate every one of them (None otherwise)."""
    row = {"epoch": epoch, "train_loss": train_loss}
    main = results.get("val")
    if main is not None:
        row.update(val_loss=main.loss, val_miou=main.scores["miou"])
        row.update({f"iou_{n}": v for n, v in zip(meta.class_names, main.scores["per_class_iou"], strict=True)})
    row.update({f"{name}_miou": r.scores["miou"] for name, r in results.items() if name != "val"})
    score = None
    if every_set:
        values = [0.0 if math.isnan(results[e.name].scores["miou"]) else results[e.name].scores["miou"]
                  for e in eval_sets]
        score = sum(e.size * v for e, v in zip(eval_sets, values, strict=True)) / sum(e.size for e in eval_sets)
        row["score"] = score
    row["lr"] = lr
    return row, score


def summary(row: dict, state: TrainState, epochs: int, improved: bool) -> str:
    """The epoch's line on the console."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_mIoU {row['val_miou']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in row.items() if k.endswith("_miou") and k != "val_miou"]
    if state.best_epoch:
        parts.append(f"best {state.best_score:.4f} @{state.best_epoch}" + (" *" if improved else ""))
    parts += [f"lr {row['lr']:.2e}", f"{row['time_s']:.1f}s"]
    return "  ".join(parts)
