"""User-facing errors: one exception type for mistakes a user can fix, printed as one line without a traceback."""
import errno
import gc
import os
import sys
import time
from collections.abc import Callable

# Failures of the machine rather than of segkit: said in one line, like a user's mistake, because the fix is theirs.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
                       errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
                       errno.EROFS: "the file system is read-only: write elsewhere",
                       errno.EACCES: "permission denied: write elsewhere or fix the permissions"}


class UserError(Exception):
    """A mistake in the user's data or flags; the message names the file or flag and the fix."""


def is_main_process() -> bool:
    """False in the ranks > 0 of a torchrun job: they stay quiet so a message is printed once."""
    return os.environ.get("RANK", "0") == "0"


def shown(items: list, n: int = 6) -> str:
    """Up to n items of a list for a message, then how many more: "a, b, c ... and 12 more"."""
    listed = ", ".join(str(i) for i in items[:n])
    return listed + (f" ... and {len(items) - n} more" if len(items) > n else "")


def problem_list(head: str, problems: list[str], shown: int = 20) -> UserError:
    """One error for several problems: the head, then one line each, up to `shown` of them (a folder of a thousand
    bad files shows the pattern, not a thousand lines)."""
    rest = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return UserError(head + "\n  " + "\n  ".join(problems[:shown]) + rest)


def raise_problems(problems: list[str], where: str) -> None:
    """The problems found in `where` as one error, if any: a single one as it is, several under their count."""
    if len(problems) > 1:
        raise problem_list(f"{len(problems)} problems in {where}:", problems)
    if problems:
        raise UserError(problems[0])


_warned: set[str] = set()


def warn(message: str) -> None:
    """A legitimate but suspicious choice: one `warning:` line on stderr, once per process."""
    if is_main_process() and message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A choice segkit made for the user: one `note:` line, once per process."""
    if is_main_process() and message not in _warned:
        _warned.add(message)
        print(f"note: {message}", flush=True)


def require(script: str, modules: tuple[str, ...], fix: str = "pip install -r requirements.txt") -> None:
    """One error line, before any work, where a package the script needs is missing or broken."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 -- broken installs raise more than ImportError
            raise UserError(f"{script} needs {name}, which does not import ({type(e).__name__}: {str(e)[:100]}); "
                            f"{fix}") from None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(); user errors print as `error: ...` and exit 2, Ctrl-C exits 130."""
    for name in ("stdout", "stderr"):  # started with it closed (`2>&-`): progress bars write to nothing, not fail
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (open for the process's life)
    try:
        _run(main)
    finally:
        # Everything is written and closed by now: spare the interpreter's last garbage collections over torch's
        # objects, which take 0.5-2 s at exit.
        gc.freeze()


def _run(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        _fail(f"{e.filename or 'writing'}: {_ENVIRONMENT_ERRNOS[e.errno]}")
    except MemoryError:
        _fail("out of memory: use a smaller --batch-size or --image-size / --tile-size")
    except RuntimeError as e:  # torch.OutOfMemoryError, named so torch need not be imported here
        if type(e).__name__ == "OutOfMemoryError":
            _fail("out of GPU memory: use a smaller --batch-size or --image-size / --tile-size, or --amp bf16")
        if not shm_full(str(e)):
            raise
        _fail("the shared memory loader workers hand batches over in (/dev/shm) ran out: pass -w 0 or a smaller "
              "-w, or give the machine more shared memory (Docker: --shm-size=8g)")
    except KeyboardInterrupt as e:
        if is_main_process():
            print(str(e) or "interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)


def shm_full(message: str) -> bool:
    """torch's ways of saying that a loader worker's batch did not fit in /dev/shm."""
    return "(shm)" in message or "out of shared memory" in message or (
        "</torch_" in message and "No space left" in message)


# torchrun ends every process a tenth of a second after the first one fails (its --monitor-interval).
SAME_ERROR_GRACE_S = 3.0


def _fail(message: str) -> None:
    """Under torchrun, process 0 says what every process found; another process speaks after a grace period, which
    it outlives only when the mistake was its own (a file only it read): one error line either way."""
    if not is_main_process():
        time.sleep(SAME_ERROR_GRACE_S)
        message += f" (process {os.environ['RANK']})"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
