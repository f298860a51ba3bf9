"""Where and how computation runs: device choice, mixed precision, threads and loader workers, torchrun processes.

torch is imported inside the functions that need it: the dataset tools take cpu_count() from here and must start
without loading torch.
"""
import contextlib
import gc
import importlib
import importlib.util
import math
import os
import sys
import types

from errors import UserError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@contextlib.contextmanager
def gc_paused():
    """For the heavy imports (torch, segmentation_models_pytorch): Python's cyclic garbage collector would traverse
    their growing heap again and again, about a fifth of the import time (bench/RESULTS.md). What they made is then
    frozen: later collections skip it, and forked loader workers do not copy its pages by touching it."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


_DYNAMO_UTILS = "torch._dynamo.utils"


class _DynamoUtilsLater(types.ModuleType):
    """Stands in for torch._dynamo.utils: the function torchvision takes from it loads it when first called; any
    other name loads it at once (whatever imports the compiler for real still gets it)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # module introspection (inspect.getmodule asks every module for __file__)
            raise AttributeError(name)
        if name == "is_compile_supported":
            return lambda *args, **kwargs: getattr(_dynamo_utils(), name)(*args, **kwargs)
        return getattr(_dynamo_utils(), name)


def _dynamo_utils() -> types.ModuleType:
    """The real torch._dynamo.utils, loaded now if need be."""
    _real_compiler()
    return importlib.import_module(_DYNAMO_UTILS)


class _CompilerLater(types.ModuleType):
    """Stands in for torch._dynamo in a process that never compiles. torch.optim calls two of its functions on every
    step and when an optimizer is made: graph_break, and disable (through torch._disable_dynamo), which change
    nothing outside compilation. Any other name (`__path__` for a submodule import) loads the real compiler, so
    whatever needs it (DistributedDataParallel does) still gets it."""

    def graph_break(self, *args, **kwargs) -> None:
        pass

    def disable(self, fn=None, *args, **kwargs):
        return _not_compiled(fn)

    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__path__":  # module introspection (inspect asks for __file__)
            raise AttributeError(name)
        return getattr(_real_compiler(), name)


class _LoadedOnce:
    """An import finder for the one case the stand-in makes: `import torch._dynamo.X` asks it for `__path__`, which
    loads the real package, X among its submodules; the import would then run X's file a second time (two copies of
    its state). This answers with the module already loaded, its own spec kept."""

    def __init__(self):
        self.specs = {}

    def find_spec(self, name: str, path, target=None):
        if name.startswith("torch._dynamo.") and name in sys.modules:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = sys.modules[spec.name]
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        with contextlib.suppress(AttributeError):  # torch's config modules refuse new attributes (and kept theirs)
            module.__spec__ = self.specs.pop(module.__name__)


def _real_compiler() -> types.ModuleType:
    """The real torch._dynamo, loaded now if need be (its stand-ins out of the way first)."""
    import torch

    if isinstance(sys.modules.get("torch._dynamo"), _CompilerLater):
        del sys.modules["torch._dynamo"]
        del torch._dynamo  # the import sets the real one
    if isinstance(sys.modules.get(_DYNAMO_UTILS), _DynamoUtilsLater):
        del sys.modules[_DYNAMO_UTILS]
    return importlib.import_module("torch._dynamo")


def never_compiles() -> None:
    """For train.py without --compile, a process of its own: torch's compiler (torch._dynamo, 1-6 s of start-up and
    ~150 MB resident: bench/RESULTS.md) is replaced for the process's life by stand-ins that load it the moment
    anything but its no-op calls is asked for. Not for a process that may compile or export later (the
    tests): torch would have remembered some of its functions as never compiled."""
    import torch

    if "torch._dynamo" in sys.modules:
        return
    sys.modules["torch._dynamo"] = torch._dynamo = _CompilerLater("torch._dynamo")
    sys.modules[_DYNAMO_UTILS] = _DynamoUtilsLater(_DYNAMO_UTILS)
    sys.meta_path.insert(0, _LoadedOnce())


def _not_compiled(fn=None, *args, **kwargs):
    """torch.compiler.disable for a process that never compiles, where it changes nothing."""
    return (lambda f: f) if fn is None else fn


@contextlib.contextmanager
def compiler_not_loaded():
    """For processes that only predict (predict.py, validate.py, serve.py): import the model libraries without
    torch's compiler, torch._dynamo (~150 MB resident, 3 s of import on a CPU: bench/RESULTS.md). torchvision takes a
    helper from it that it calls only when compiling; timm and torchvision wrap functions in torch.compiler.disable,
    which loads it and only matters under torch.compile. Here that helper loads when first called and those wrappers
    are left off. train.py without --compile goes further (never_compiles); export (torch.export) imports as usual."""
    import torch

    if "torch._dynamo" in sys.modules:
        yield
        return
    disable = torch.compiler.disable
    torch.compiler.disable = _not_compiled
    sys.modules[_DYNAMO_UTILS] = _DynamoUtilsLater(_DYNAMO_UTILS)
    try:
        yield
    finally:
        torch.compiler.disable = disable
        if isinstance(sys.modules.get(_DYNAMO_UTILS), _DynamoUtilsLater):
            del sys.modules[_DYNAMO_UTILS]


def select_device(cpu: bool = False, device: str | None = None):
    """--cpu, else --device (`0`, `cuda:1`, `mps`, `cpu`), else the first accelerator found."""
    import torch

    if cpu:
        return torch.device("cpu")
    if device:
        try:
            dev = torch.device(f"cuda:{device}" if device.isdigit() else device)
        except RuntimeError:
            raise UserError(f"--device {device}: not a device; use 0, cuda:1, mps or cpu") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--device {device}: no such CUDA device here "
                            f"({torch.cuda.device_count()} found); use --cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available here; use --cpu")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"--device {device}: segkit runs on cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(choice: str, device):
    """The autocast dtype: auto is bf16 on CUDA where supported, else fp16 on CUDA, else off."""
    import torch

    if choice == "off":
        return None
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; on the CPU use --amp bf16 or off")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def channels_last(device) -> bool:
    """Channels-last convolutions: measured faster on CUDA and on the CPU (bench/RESULTS.md); MPS unmeasured."""
    return device.type in ("cuda", "cpu")


def cpu_count() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (docker --cpus, Kubernetes limits),
    which neither Python nor PyTorch reads: threads beyond the quota are throttled, not run."""
    return quota_threads() or _affinity()


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def quota_threads() -> int | None:
    """The thread count for compute libraries where a CPU quota, not the visible cores, limits this process, else
    None. torch, OpenCV and onnxruntime start a thread per visible core, and threads beyond a quota are throttled:
    under a 1-CPU quota a training step took 1.6x as long with 8 threads as with 1 (bench/RESULTS.md)."""
    quota = cgroup_cpu_quota()
    if not quota:
        return None
    n = max(1, min(_affinity(), math.ceil(quota)))
    return n if n < (os.cpu_count() or 1) else None


def cap_threads() -> None:
    """torch's and OpenCV's threads within the CPU quota (a no-op without one)."""
    n = quota_threads()
    if n is not None:
        import cv2
        import torch

        torch.set_num_threads(min(n, torch.get_num_threads()))
        cv2.setNumThreads(n)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroup path (v2 cpu.max, v1 cpu.cfs_quota_us), or
    None where there is none."""
    try:
        with open(membership) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    quotas = []
    for _, controllers, path in (parts for parts in lines if len(parts) == 3):
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        folder = os.path.join(root, "" if v2 else controllers, path.lstrip("/"))
        while folder.startswith(root):  # the process's cgroup and its ancestors (the root one, in a container)
            with contextlib.suppress(OSError, ValueError):
                quotas.append(_read_quota(folder, v2))
            folder = os.path.dirname(folder)
    quotas = [q for q in quotas if q]
    return min(quotas) if quotas else None


def _read_quota(folder: str, v2: bool) -> float | None:
    if v2:
        with open(os.path.join(folder, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with open(os.path.join(folder, "cpu.cfs_quota_us")) as f, open(os.path.join(folder, "cpu.cfs_period_us")) as g:
        quota, period = int(f.read()), int(g.read())
    return None if quota <= 0 else quota / period


def default_workers(device, world_size: int = 1) -> int:
    """Loader processes per training process: most cores when an accelerator computes; on the CPU the model needs
    the cores itself."""
    n = max(1, cpu_count() // world_size)
    if device.type == "cpu":
        return max(1, min(4, n // 2))
    return max(2, min(16, n - 1))


def configure(device, deterministic: bool = False) -> None:
    """Fast kernels by default (cuDNN autotuning, TF32 matmuls); --deterministic trades them for repeatability."""
    import torch

    cap_threads()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.set_float32_matmul_precision("high")


def worker_init(_: int, niceness: int = 0) -> None:
    """Inside a loader worker: one thread each, so workers do not fight over cores; a lower priority (niceness),
    so the process that feeds the GPU is never starved by the workers reading ahead for it."""
    import cv2
    import torch

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    if niceness:
        os.nice(niceness)
    start_shm_manager_quietly(torch)


def start_shm_manager_quietly(torch) -> None:
    """Under file_system sharing, a worker's first shared batch starts a torch_shm_manager, which inherits stderr
    and outlives the run by 2 s: whatever reads our output through a pipe (`| tee`, a notebook, a test) would wait
    for it. Started here, on /dev/null instead."""
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (closed by the caller): nothing to keep open
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        torch.empty(1).share_memory_()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ------------------------------------------------------------------------------------------------ torchrun
class Processes:
    """This process's place in a torchrun job (rank, world size) and its device; one process of one outside it."""

    def __init__(self, cpu: bool = False, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world == 1:
            self.device = select_device(cpu, device)
            return
        import datetime

        import torch

        if device:
            raise UserError("--device does not go with torchrun: each process takes the GPU of its local rank "
                            "(use CUDA_VISIBLE_DEVICES to choose GPUs, or --cpu)")
        cuda = torch.cuda.is_available() and not cpu
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        # A generous timeout: process 0 alone reads the whole dataset once while the others wait.
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """Process 0's value of a picklable object, in every process."""
        if self.world == 1:
            return value
        import torch

        box = [value]
        torch.distributed.broadcast_object_list(box, 0)
        return box[0]

    def close(self) -> None:
        if self.world > 1:
            import torch

            torch.distributed.destroy_process_group()
