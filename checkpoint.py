"""The checkpoint: what a trained model is (ModelMeta), how its files are written and read, and when a training run
writes them (CheckpointSaver). Every script goes through this module; none reads checkpoint keys or calls torch.load
itself.

A checkpoint file is a dict of tensors and plain values, loadable with torch.load(weights_only=True):
  model     the model's state dict
  meta      ModelMeta.to_dict(): architecture, classes and label values, bands, normalisation, image size, ...
  epoch     epochs completed when it was written
  score     that epoch's selection score (val mIoU), or None
  training  last.pth only: optimizer, scheduler and scaler state and the trainer's state, enough to resume
Version 1 (segkit 0.1) kept the training state at the top level; load() reads it too.

torch is imported only where files are read or written: ModelMeta also describes exported ONNX bundles, which are
used where torch is not installed.
"""
import copy
import csv
import io
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from errors import UserError, note, warn
from fileio import as_disk_error, atomic_output, write_text
from labels import ChannelStats, Labels

FORMAT = "segkit-checkpoint"
VERSION = 2
SEGKIT_VERSION = "0.2.0"


def _set_by(*flags: str) -> dict:
    """A ModelMeta field set by these train.py flags: a resumed run refuses to change them (see model_flags)."""
    return {"metadata": {"flags": flags}}


@dataclass
class ModelMeta:
    """Everything needed to rebuild a model and prepare its input exactly as in training. A setting that shapes the
    model is one field here, named with the flags that set it: model.build_model reads it from here, and a resumed
    run refuses to change it."""
    arch: str = field(**_set_by("model"))  # a key of model.ARCHITECTURES
    encoder: str = field(**_set_by("encoder"))
    in_channels: int = field(**_set_by("add_dirs"))  # image channels + extra bands
    out_channels: int = field(**_set_by("class_list", "max_mask_val"))  # 1 (binary, sigmoid) or the classes (softmax)
    labels: Labels = field(**_set_by("class_list", "max_mask_val", "ignore_label", "class_names"))
    add_dirs: list[str] = field(**_set_by("add_dirs"))  # extra band folders, stacked after the image channels
    stats: ChannelStats = field()  # the training set's exact per-channel statistics: normalisation and value range
    dtype: str = field()  # pixel type of the training images
    image_size: int = field(**_set_by("image_size"))  # training crop (or --resize size)
    resize: bool = field(**_set_by("resize"))
    val_tile_size: int = field()  # validation predicts images up to this size whole, larger ones in tiles of it
    threshold: float = 0.5  # binary decision threshold (validate.py --save-threshold tunes it)
    types: str = ""  # the training files' own pixel types where they differ: "uint16 image + uint8 nir"
    weights: str = ""  # where the initial weights came from
    train_args: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""

    @property
    def class_names(self) -> list[str]:
        return self.labels.names

    @property
    def binary(self) -> bool:
        return self.labels.binary

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(format=FORMAT, version=VERSION, labels=self.labels.to_meta(), class_names=self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "the checkpoint") -> "ModelMeta":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source} is not a segkit checkpoint or bundle (no segkit metadata); pass a best.pth "
                            "or last.pth written by segkit's train.py, or a bundle written by export.py")
        if d.get("version", 0) > VERSION:
            raise UserError(f"{source} was written by a newer segkit (format version {d['version']}); update segkit")
        try:
            return cls(arch=d["arch"], encoder=d["encoder"], in_channels=int(d["in_channels"]),
                       out_channels=int(d["out_channels"]), labels=Labels.from_meta(d["labels"]),
                       add_dirs=list(d["add_dirs"]), stats=ChannelStats(**d["stats"]), dtype=d["dtype"],
                       image_size=int(d["image_size"]), resize=bool(d["resize"]),
                       val_tile_size=int(d.get("val_tile_size", d["image_size"])),
                       threshold=float(d.get("threshold", 0.5)), types=str(d.get("types", "")),
                       weights=d.get("weights", ""),
                       train_args=dict(d.get("train_args", {})), versions=dict(d.get("versions", {})),
                       created=d.get("created", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: segkit metadata is incomplete ({type(e).__name__}: {e}); the file is "
                            "damaged or was edited by hand") from None


def model_flags() -> tuple[str, ...]:
    """The train.py flags (argparse names) that shape the model: those a resumed run must not change."""
    return tuple(dict.fromkeys(f for item in fields(ModelMeta) for f in item.metadata.get("flags", ())))


@dataclass
class Checkpoint:
    model: dict  # state dict
    meta: ModelMeta
    epoch: int
    score: float | None = None
    training: dict | None = None  # {"optimizer", "scheduler", "scaler", "state"}: last.pth only

    def to_dict(self) -> dict:
        d = {"model": self.model, "meta": self.meta.to_dict(), "epoch": self.epoch, "score": self.score}
        if self.training is not None:
            d["training"] = self.training
        return d


def save(path: Path, ckpt: Checkpoint) -> None:
    """Write a checkpoint atomically: a killed run leaves the previous file intact, never a torn one."""
    import torch

    with atomic_output(path) as tmp:
        try:
            torch.save(ckpt.to_dict(), tmp)
        except RuntimeError as e:  # torch's zip writer says a full disk as "unexpected pos"
            raise as_disk_error(path, e) from None


def find(path: Path, flag: str) -> Path:
    """A checkpoint file as given, or an experiment folder's best.pth (else last.pth)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = next((path / n for n in ("best.pth", "last.pth") if (path / n).is_file()), None)
    if found is None:
        inside = sorted((p.parent for p in path.glob("*/last.pth")), key=lambda p: (p / "last.pth").stat().st_mtime)
        if inside:  # the log folder itself
            names = ", ".join(p.name for p in inside[::-1][:6]) + (" ..." if len(inside) > 6 else "")
            raise UserError(f"{flag} {path} holds {len(inside)} experiments (newest first: {names}); pass one, e.g. "
                            f"the one trained last: {flag} {inside[-1]}")
        raise UserError(f"{flag} {path}: no best.pth or last.pth in it, nor an exported bundle's segkit.json; give a "
                        "segkit experiment folder, a checkpoint or a bundle")
    if found.name == "last.pth":
        note(f"{path} has no best.pth (no epoch was validated yet); using last.pth, the latest epoch's weights")
    return found


def _read(path: Path, what: str) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch.load raises, the file is not ours
        pickled = "weights_only" in str(e) and (head == b"PK" or head[:1] == b"\x80")  # torch.save's zip or pickle
        kind = "a checkpoint from another tool (it holds pickled objects)" if pickled else \
            "not a readable PyTorch checkpoint (truncated or another kind of file)"
        raise UserError(f"{path} is {kind}; pass a best.pth or last.pth written by segkit's train.py") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is a PyTorch file but not a segkit checkpoint; pass a best.pth or last.pth")
    return d


def load(path: Path) -> Checkpoint:
    """A segkit checkpoint of any version, or a UserError saying what the file is instead."""
    d = _read(path, "checkpoint")
    meta = ModelMeta.from_dict(d.get("meta"), str(path))
    training = d.get("training")
    if d["meta"].get("version") == 1 and "optimizer" in d:  # version 1: the training state at the top level
        state = {k: d[k] for k in ("epoch", "best_score", "best_epoch", "bad_epochs", "early_stopped", "history")}
        training = {"optimizer": d["optimizer"], "scheduler": d["scheduler"], "scaler": d["scaler"], "state": state}
    if not isinstance(d.get("model"), dict) or not isinstance(d.get("epoch"), int):
        raise UserError(f"{path}: segkit checkpoint without weights or epoch; the file is damaged")
    return Checkpoint(d["model"], meta, d["epoch"], d.get("score"), training)


def best_to_keep(path: Path, epoch: int, score: float, best_epoch: int) -> tuple[float, int]:
    """The best score and its epoch for a run resuming at `epoch`: a kill between writing best.pth and last.pth left a
    newer best behind, whose score stands; a damaged best.pth is replaced by the next epoch that improves."""
    if not Path(path).exists():
        return score, best_epoch
    try:
        best = load(path)
    except UserError as e:
        warn(f"{e}; it will be replaced by the next epoch that improves the val score")
        return -math.inf, best_epoch
    if best.epoch > epoch and best.score is not None and best.score > score:
        return best.score, best.epoch
    return score, best_epoch


def read_weights(path: Path) -> dict:
    """A state dict of tensors from a foreign weights file (.pth/.pt/.bin, or .safetensors), for fine-tuning;
    a segkit checkpoint gives its model weights."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure to read it is the file's problem
        raise UserError(f"--encoder-weights {path}: cannot be loaded as weights ({type(e).__name__}: "
                        f"{str(e)[:100]})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--encoder-weights {path}: not a state dict of tensors")
    return state


def snapshot(obj):
    """A copy of a (nested) state on the CPU that later training steps cannot change: tensors cloned, containers
    rebuilt, other values deep-copied."""
    if hasattr(obj, "detach"):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Runs the end-of-epoch writes (checkpoints, then the CSV and pictures that must not get ahead of them) in
    one thread, in order, while the next epoch trains. One job is in flight at most: submitting waits for the
    previous one, so memory holds one snapshot. A failed job raises in the training thread at the next submit or
    at close()."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="segkit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 -- handed to the training thread
                self.error = e
            finally:
                self.jobs.task_done()

    def busy(self) -> bool:
        """A job is still running."""
        return self.jobs.unfinished_tasks > 0

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self.jobs.put(job)

    def wait(self) -> None:
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Finish the pending job and stop the thread."""
        try:
            self.wait()
        finally:
            self.jobs.put(None)
            self.thread.join()


class CheckpointSaver:
    """A training run's checkpoint policy (as timm's CheckpointSaver): at an epoch's end best.pth when the val score
    improved, then last.pth, then metrics.csv from the history last.pth holds, then the log; in the background while
    the next epoch trains, so the loop never waits for the disk. While a write is still in flight an epoch stays
    pending (improved weights are copied at once) and the next free epoch end, or flush(), writes the newest: a kill
    costs at most the epochs since the last write. A run killed at any moment resumes from last.pth and rewrites
    metrics.csv from it, so the CSV never holds a row the checkpoint does not.

    weights() and training() give the model's and the optimizer's current state; log(rows, worst) runs after each
    write, with the metrics rows written since the last one."""

    def __init__(self, exp_dir: Path, meta: ModelMeta, weights: Callable[[], dict], training: Callable[[], dict],
                 log: Callable[[list, list | None], None]):
        self.exp_dir, self.meta, self.weights, self.training, self.log = Path(exp_dir), meta, weights, training, log
        self.writer = BackgroundWriter()
        self.saved_epoch = 0  # the newest epoch handed to the writer: what last.pth holds once it is written
        self.unsaved: list[dict] = []  # metrics rows of the epochs since
        self.best: Checkpoint | None = None  # an improved epoch's weights, waiting for the writer

    def start(self, history: list[dict], saved_epoch: int, then: Callable[[], None]) -> None:
        """metrics.csv as last.pth has it (a resumed run drops rows written after it), then `then` in the writer."""
        self.saved_epoch = saved_epoch
        write_csv(self.exp_dir, history)
        self.writer.submit(then)

    def epoch_end(self, history: list[dict], improved: bool, worst: Callable[[], list | None]) -> None:
        """The epoch whose row ends `history`: written now if the writer is free, else kept pending."""
        row = history[-1]
        self.unsaved.append(row)
        if not self.writer.busy():
            self.save(history, improved, worst)
        elif improved:
            self.best = Checkpoint(snapshot(self.weights()), self.meta, row["epoch"], row.get("score"))

    def flush(self, history: list[dict], worst: Callable[[], list | None]) -> None:
        """Write the pending epochs, if any (at the end of a run)."""
        if self.unsaved:
            self.save(history, False, worst)

    def save(self, history: list[dict], improved: bool, worst: Callable[[], list | None]) -> None:
        """Copy what the writes need now (training goes on meanwhile) and hand them to the writer."""
        epoch, score, weights = history[-1]["epoch"], history[-1].get("score"), snapshot(self.weights())
        last = Checkpoint(weights, self.meta, epoch, score, snapshot(self.training()))
        best = Checkpoint(weights, self.meta, epoch, score) if improved else self.best
        history, rows, pictures = list(history), self.unsaved, worst()

        def job() -> None:
            if best is not None:
                save(self.exp_dir / "best.pth", best)
            save(self.exp_dir / "last.pth", last)
            write_csv(self.exp_dir, history)
            self.log(rows, pictures)

        self.writer.submit(job)
        self.saved_epoch, self.unsaved, self.best = epoch, [], None

    def close(self) -> None:
        self.writer.close()


def write_csv(exp_dir: Path, history: list[dict]) -> None:
    """metrics.csv from the history: one row per completed epoch, rewritten atomically."""
    columns = []
    for row in history:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    if history or not (Path(exp_dir) / "metrics.csv").exists():
        write_text(Path(exp_dir) / "metrics.csv", out.getvalue())
