"""The checkpoint: what a trained model is (ModelMeta) and how its files are written and read. Every script goes
through this module; none reads checkpoint keys or calls torch.load itself.

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
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from errors import UserError, note
from fileio import as_disk_error, atomic_output
from labels import ChannelStats, Labels

FORMAT = "segkit-checkpoint"
VERSION = 2
SEGKIT_VERSION = "0.2.0"


@dataclass
class ModelMeta:
    """Everything needed to rebuild a model and prepare its input exactly as in training."""
    arch: str  # a key of model.ARCHITECTURES
    encoder: str
    in_channels: int  # image channels + extra bands
    out_channels: int  # 1 (binary, sigmoid) or the number of classes (softmax)
    labels: Labels
    add_dirs: list[str]  # extra band folders, stacked after the image channels in this order
    stats: ChannelStats  # the training set's exact per-channel statistics: normalisation and value range
    dtype: str  # pixel type of the training images
    image_size: int  # training crop (or --resize size)
    resize: bool
    val_tile_size: int  # validation predicts images up to this size whole, larger ones in tiles of it
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
