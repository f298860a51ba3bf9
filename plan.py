"""The training plan: the settings a run given a time budget (train.py --budget) trains with, chosen from measured
facts about the data (a Fingerprint) and the machine (a Machine), each with its reason. A flag the user gives wins
and is shown as theirs. Pure functions: they run nothing and read no files, so tests can feed them made-up machines
and datasets.

Two stages: choose() before the model exists (crop, batch on the CPU, loss), then schedule() once
a few real training steps and a validation estimate are timed (steps, samples per epoch, when to validate, the
augmentation the number of passes calls for).
"""
import math
from dataclasses import asdict, dataclass, field

CPU_CROP, GPU_CROP = 256, 512  # largest planned crop: on the CPU every pixel of a step costs; a GPU takes more
CONTEXT = 4  # a crop spans at least this many typical objects across
RARE = 0.05  # a class below this share of the training pixels gets a per-pixel loss beside dice (bce / ce)
GPU_SHARE = 0.6  # of a GPU's memory, for the batch: the rest for the allocator's cache, validation and spikes
MAX_BATCH = 64
PROBED_BATCHES = (8, 16, 32, 64)  # tried on a GPU, until one runs out of memory
VAL_SHARE = 0.1  # of the training time, spent validating at most
MIN_VALIDATIONS = 8  # validate at least this often, where the budget allows, to keep the best weights
MIN_EPOCH_STEPS = 8  # an epoch (a checkpoint write) every so many steps at least: tiny datasets repeat within one


@dataclass
class Fingerprint:
    """What the data check measured about a dataset."""
    images: int  # training images
    median_side: int  # the training images' median short side
    val_pixels: int  # pixels of every validation image
    channels: int
    dtype: str
    class_shares: list[float]  # each class's share of the training pixels, background first
    binary: bool
    object_size: float | None = None  # typical foreground object, across, in pixels (None: unknown)


@dataclass
class Machine:
    device: str  # "cpu", "cuda" or "mps"
    name: str  # "2 cores" or the GPU's name
    memory: float | None = None  # the GPU's memory in bytes
    cores: int = 1


@dataclass
class Choice:
    value: object
    reason: str
    yours: bool = False  # given on the command line: the plan keeps it


@dataclass
class Plan:
    choices: dict[str, Choice] = field(default_factory=dict)

    def value(self, name: str):
        return self.choices[name].value

    def set(self, name: str, value, reason: str, given: dict) -> None:
        """A planned value, unless the user gave the flag: then theirs, said as such."""
        if name in given:
            self.choices[name] = Choice(given[name], "your flag", True)
        else:
            self.choices[name] = Choice(value, reason)

    def table(self) -> str:
        width = max(len(n) for n in self.choices)
        return "\n".join(f"  {n:<{width}}  {c.value!s:<10} {'(yours)' if c.yours else c.reason}"
                         for n, c in self.choices.items())

    def to_dict(self) -> dict:
        return {n: asdict(c) for n, c in self.choices.items()}


def fingerprint(data, labels) -> Fingerprint:
    """The Fingerprint of a checked dataset (checks.DataSummary) with its labels."""
    pixels = [float(c) for c in data.stats.class_pixels]
    sides = sorted(min(s) for s in data.sizes["train"])
    return Fingerprint(images=len(sides), median_side=sides[len(sides) // 2],
                       val_pixels=sum(h * w for name, sizes in data.sizes.items() if name != "train" for h, w in sizes),
                       channels=data.channels, dtype=data.dtype,
                       class_shares=[c / max(sum(pixels), 1) for c in pixels], binary=labels.binary,
                       object_size=data.object_size)


def round32(x: float) -> int:
    return max(32, math.ceil(x / 32) * 32)


def choose(fp: Fingerprint, machine: Machine, given: dict) -> Plan:
    """The settings that need no timing: crop, loss, and the batch on the CPU (a GPU's batch comes from memory
    probes: batch_from_probe)."""
    plan = Plan()
    cap = CPU_CROP if machine.device == "cpu" else GPU_CROP
    side = min(fp.median_side // 32 * 32, cap)
    need = round32(CONTEXT * fp.object_size) if fp.object_size else None
    if need is not None and need < side:
        crop, why = max(need, 96 if machine.device == "cpu" else 128), (
            f"{CONTEXT} x the {fp.object_size:.0f} px objects; smaller crops make more steps in the time")
    else:
        crop, why = side, f"the images' {fp.median_side} px" + (f", at most {cap} on {machine.device}"
                                                                 if fp.median_side > cap else "")
    plan.set("image_size", max(32, crop), why, given)
    if machine.device != "cuda":
        plan.set("batch_size", 8, f"on {machine.device}: a step's time grows with the batch", given)
    rare = min(range(1, len(fp.class_shares)), key=lambda c: fp.class_shares[c]) if len(fp.class_shares) > 1 else None
    share = fp.class_shares[rare] if rare is not None else 1.0
    # No class weights on top: dice already gives each class an equal say, and weighting the cross-entropy too
    # scored lower within a budget (bench/RESULTS.md: -0.065 mIoU over two seeds multi-class, -0.06 binary).
    if share < RARE:
        loss = "dice+bce" if fp.binary else "dice+ce"
        plan.set("loss", loss, f"class {rare} is {share:.1%} of the pixels: dice skips it in batches without it, "
                 f"{loss[5:]} counts every pixel", given)
    else:
        plan.set("loss", "dice", f"the rarest class is {share:.0%} of the pixels", given)
    return plan


def batch_from_probe(plan: Plan, machine: Machine, peaks: dict[int, float], given: dict) -> None:
    """The largest probed batch whose peak memory stays within GPU_SHARE of the GPU (peaks: batch -> bytes, an
    out-of-memory left out)."""
    limit = GPU_SHARE * (machine.memory or 0)
    fits = [b for b, peak in sorted(peaks.items()) if peak <= limit] or [min(peaks, default=2)]
    b = fits[-1]
    used = peaks.get(b, 0) / max(machine.memory or 1, 1)
    plan.set("batch_size", b, f"{used:.0%} of {machine.memory / 2 ** 30:.0f} GB at {plan.value('image_size')} px"
             + ("" if b < MAX_BATCH else f" (at most {MAX_BATCH})"), given)


def schedule(plan: Plan, fp: Fingerprint, seconds: float, step_s: float, val_s: float, given: dict) -> None:
    """Steps, samples per epoch, validations and the augmentation for `seconds` of training time, from a timed step
    (step_s) and the estimated time of one validation (val_s). An epoch is one pass over the training images (or
    `repeats`, for a few images); validation costs VAL_SHARE of the time at most, yet comes MIN_VALIDATIONS times
    where a little more buys it."""
    batch = plan.value("batch_size")
    steps_per_pass = max(1, fp.images // batch)
    repeats = max(1, math.ceil(MIN_EPOCH_STEPS / steps_per_pass))
    per_epoch = steps_per_pass * repeats
    # Validations: as many as VAL_SHARE of the time pays for (MIN_VALIDATIONS where a little more buys them), at
    # least one (the last epoch's), at most one per epoch.
    validations = max(1, int(VAL_SHARE * seconds / max(val_s, 1e-6)))
    if validations < MIN_VALIDATIONS and MIN_VALIDATIONS * val_s <= 1.2 * VAL_SHARE * seconds:
        validations = MIN_VALIDATIONS
    epochs = max(1, int((seconds - validations * val_s) / step_s) // per_epoch)
    validations = min(validations, epochs)
    steps = max(1, int((seconds - validations * val_s) / step_s))
    epochs = max(1, math.ceil(steps / per_epoch))
    plan.set("repeats", repeats, f"{per_epoch} steps an epoch" + (f": {repeats} passes over the {fp.images} images"
                                                                    if repeats > 1 else ""), given)
    plan.set("epochs", epochs, f"{steps} steps of ~{step_s:.2f} s in {seconds:.0f} s of training", given)
    plan.set("validations", validations, f"~{val_s:.1f} s each ({validations * val_s / seconds:.0%} of the time), "
             "dense early, where the score moves most, sparse later", given)
    seen = steps * batch / max(fp.images, 1)
    aug = "light" if seen < 100 else "medium" if seen < 1000 else "hard"
    plan.set("aug", aug, f"each image seen ~{seen:.0f} times: " + ("little risk of memorising" if aug == "light"
                                                                     else "varied crops against memorising"), given)


def validation_epochs(epochs: int, validations: int) -> set[int]:
    """The epochs that validate: the first third of `validations` on the first epochs one after another (the score
    moves most early, and a small val set's best often comes then), the rest spread evenly on a log scale up to the
    last epoch, which always validates."""
    first = validations // 3
    start, rest = max(first, 1), validations - first
    spread = {round(start * (epochs / start) ** (k / rest)) for k in range(1, rest + 1)}
    return set(range(1, min(first, epochs) + 1)) | spread | {epochs}
