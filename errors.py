"""User-facing errors: one exception type for mistakes a user can fix, printed as one line without a traceback."""
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's data or flags; the message names the file or flag and the fix."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(); user errors print as `error: ...` and exit 2, Ctrl-C exits 130."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
