"""Where and how computation runs: device choice, mixed precision, DataLoader workers."""
import os

import torch

from errors import UserError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def select_device(cpu: bool = False, device: str | None = None) -> torch.device:
    """--cpu, else --device (`0`, `cuda:1`, `mps`, `cpu`), else the first accelerator found."""
    if cpu:
        return torch.device("cpu")
    if device:
        dev = torch.device(f"cuda:{device}" if device.isdigit() else device)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--device {device}: no such CUDA device here "
                            f"({torch.cuda.device_count()} found); use --cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available here; use --cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: auto is bf16 on CUDA where supported, else fp16 on CUDA, else off."""
    if choice == "off":
        return None
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; on the CPU use --amp bf16 or off")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """Loader processes: most cores when an accelerator computes; on the CPU the model needs the cores itself."""
    n = cpu_count()
    if device.type == "cpu":
        return max(1, min(4, n // 2))
    return max(2, min(16, n - 1))


def configure(device: torch.device, deterministic: bool = False) -> None:
    """Fast kernels by default (cuDNN autotuning, TF32 matmuls); --deterministic trades them for repeatability."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.set_float32_matmul_precision("high")


def worker_init(_: int) -> None:
    """Inside a loader worker: one thread each, so workers do not fight over cores."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
