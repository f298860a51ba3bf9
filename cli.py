"""Command-line conventions shared by every script and tool: a parser whose mistakes end in one `error:` line (exit
status 2, no usage dump), and value types that are checked when the flags are parsed, before any work starts."""
import argparse
import math
import os
import sys

from errors import is_main_process


class Parser(argparse.ArgumentParser):
    """argparse, with a flag mistake reported as one line that names the flag, like every other user error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        flag = message.split("argument ", 1)[-1].split(":", 1)[0].split("/")[-1]
        if message.endswith("expected one argument") and flag in sys.argv[:-1]:
            value = sys.argv[sys.argv.index(flag) + 1]
            if value[:1] == "-" and value[1:2].isdigit():  # taken for a flag, as argparse does with -5m
                message = f"argument {flag}: '{value}' is negative; give a value above 0"
        if is_main_process():
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' must be a finite number")
    return value


def at_least(minimum: float, kind=int):
    """An argparse type: a number of `kind` (int or float) that is >= minimum."""
    def parse(text: str):
        value = _number(kind, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum:g}"
    return parse


def pixel_count(text: str) -> int:
    """An argparse type: a number of pixels, at least one, with an optional suffix k, M or G (100M)."""
    scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(text[-1:].lower(), 1)
    value = _number(float, text[:-1] if scale > 1 else text) * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text}")
    return int(value)


def shard(text: str) -> tuple[int, int]:
    """An argparse type: K/N, the K-th (1..N) of N shares, as job arrays number their tasks."""
    k, sep, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not K/N, e.g. 1/4 for the first of four shares") from None
    if not sep or n < 1 or not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"'{text}': K/N needs 1 <= K <= N (the K-th of N shares), e.g. "
                                         f"{min(max(k, 1), max(n, 2))}/{max(n, 2)}")
    return k, n


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def multiple_of_32(flag: str):
    """An argparse type for `flag`: an image or tile side that the encoders can halve five times."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < 32 or value % 32:
            near = max(32, round(value / 32) * 32)
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of 32 (encoders halve it 5 times); use "
                                             f"{flag} {near}")
        return value

    parse.__name__ = "multiple of 32"
    return parse


def add_runtime_flags(group, workers: bool = True) -> None:
    """Where a script computes, declared once for every script: -w (loader processes), --cpu, --device, --amp."""
    from runtime import AMP_CHOICES

    if workers:
        group.add_argument("-w", "--workers", type=at_least(0), default=None,
                           help="data-loading processes (default: from the CPU)")
    group.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    group.add_argument("--device", default=None, help="device: 0, cuda:1, mps, cpu (default: the first GPU, else the "
                                                      "CPU); bundles run on onnxruntime's own choice")
    group.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help="mixed precision on a GPU: auto = bf16 where the GPU has it, else fp16; off on the CPU")


def progress(*args, **kwargs):
    """A tqdm progress bar where someone watches it live: a terminal, or a notebook running the script (Colab).
    Written to a file or a pipe, bars are left out: a log gets the one summary line of each stage, not hundreds of
    carriage-return updates."""
    from tqdm import tqdm

    watched = sys.stderr.isatty() or "JPY_PARENT_PID" in os.environ or "COLAB_RELEASE_TAG" in os.environ
    kwargs["disable"] = kwargs.get("disable", False) or not watched or os.environ.get("TQDM_DISABLE") == "1"
    return tqdm(*args, dynamic_ncols=True, **kwargs)
