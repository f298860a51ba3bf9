"""Training to a time budget: --budget as a duration, the clock a budget run keeps, and the timings its plan needs
(real training steps, timed; on a GPU the largest batch that fits, found by trying, out-of-memory included).

The budget counts from when train.py's process started: start-up, the data check, the timings, training, validation
and the final writes all come out of it.
"""
import argparse
import math
import os
import re
import time
from pathlib import Path


def _process_age() -> float:
    """Seconds since this process started (Linux; elsewhere 0: the budget then counts from this import)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = float(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


START = time.monotonic() - _process_age()
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LONGEST = 30 * 86400
PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def duration(text: str) -> float:
    """An argparse type: a duration with units, 90s, 20m, 1.5h, 1h30m; in seconds."""
    clean = text.strip().lower().replace(" ", "")
    if not clean or PART.sub("", clean):
        hint = f"; write {clean}m or {clean}s" if re.fullmatch(r"\d+(\.\d+)?", clean) else ""
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration such as 90s, 20m, 1.5h or 1h30m{hint}")
    seconds = sum(float(n) * UNITS[u] for n, u in PART.findall(clean))
    if not 0 < seconds <= LONGEST:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than 0 and at most 30 days")
    return seconds


def as_time(seconds: float) -> str:
    """12:05 for 12 min 5 s, 1:02:03 beyond an hour."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Clock:
    """A budget run's time: `seconds` in all, `spent` of them by the processes that ran it before (a resumed run)."""

    def __init__(self, seconds: float, spent: float = 0.0):
        self.seconds, self.end = seconds, START + seconds - spent
        self.val_s = 0.0  # one validation, as last measured
        self.step_s = 0.0  # one training step, as last measured
        self.finish_s = 3.0  # the final writes and exit
        self.trained = (0.0, 0)  # seconds and steps of training in this process

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> float:
        return self.seconds - self.left()

    def train_left(self) -> float:
        """Seconds left for training steps: the last validation and the final writes are kept back."""
        return self.left() - self.val_s - self.finish_s

    def steps_left(self, validations: int) -> int:
        """Training steps that fit in the time left besides `validations` more validations and the final writes."""
        if not self.step_s:
            return 0
        return max(0, int((self.left() - self.finish_s - validations * self.val_s) / self.step_s))

    def timed(self, train_s: float, steps: int, val_s: float | None) -> None:
        """An epoch's timings: the step time becomes this process's steady rate so far; a validation's, its own."""
        self.trained = (self.trained[0] + train_s, self.trained[1] + steps)
        self.step_s = self.trained[0] / max(self.trained[1], 1)
        self.val_s = val_s or self.val_s



def time_steps(model, criterion, normalize, optimizer, shape: tuple, classes: int, device, autocast, steps: int = 3
               ) -> float:
    """Seconds per training step (forward, backward, optimizer) at `shape` (N, C, H, W), after one untimed step;
    the weights are restored afterwards, so the timing leaves no trace in the run."""
    import copy

    import torch

    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    x = torch.rand(shape, device=device)
    target = torch.randint(0, classes, (shape[0], *shape[2:]), device=device)
    model.train()
    try:
        for i in range(steps + 1):
            if i == 1:
                sync(device)
                t0 = time.perf_counter()
            with autocast():
                loss = criterion(model(normalize(x)), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return (time.perf_counter() - t0) / steps
    finally:
        model.load_state_dict(state)
        optimizer.load_state_dict(opt_state)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_peaks(model, criterion, normalize, optimizer, sizes: list[int], shape: tuple, classes: int, device,
                autocast) -> dict[int, float]:
    """Peak GPU memory of a training step at each batch size (shape: C, H, W), stopping at the first that does not
    fit: an out-of-memory is caught, its memory freed, and the sizes before it kept."""
    import torch

    peaks = {}
    for b in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            time_steps(model, criterion, normalize, optimizer, (b, *shape), classes, device, autocast, steps=1)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            break
        peaks[b] = float(torch.cuda.max_memory_allocated(device))
        if not math.isfinite(peaks[b]):
            break
    return peaks


def machine(device):
    """The facts about this machine a plan reads (plan.Machine)."""
    from plan import Machine
    from runtime import cpu_count

    if device.type != "cuda":
        return Machine(device.type, f"{cpu_count()} CPU cores", cores=cpu_count())
    import torch

    gpu = torch.cuda.get_device_properties(device)
    return Machine("cuda", gpu.name, float(gpu.total_memory), cpu_count())


class StepTimer:
    """Training steps of a model timed on synthetic batches (net: the plain network), with the run's loss,
    normalisation, optimizer and mixed precision; on a GPU also their peak memory by batch size."""

    def __init__(self, net, criterion, normalize, optimizer, shape: tuple, classes: int, device, amp):
        import contextlib

        import torch

        self.parts = (net, criterion, normalize, optimizer)
        self.shape, self.classes, self.device = shape, classes, device
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    def peaks(self, sizes: list[int]) -> dict[int, float]:
        return probe_peaks(*self.parts, sizes, self.shape, self.classes, self.device, self.autocast)

    def seconds(self, batch: int) -> float:
        return time_steps(*self.parts, (batch, *self.shape), self.classes, self.device, self.autocast)
