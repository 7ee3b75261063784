"""How the command lines end: a user error is one line, `error: ...`, and exit status 2.

The project's validation errors (a bad config value, a bad input file, a missing path) are
ValueError / KeyError / FileNotFoundError whose message names the problem and the fix; a
traceback around them only hides that line. `--traceback` (or `TRANSFORMER_TRACEBACK=1`) shows
it for debugging. Library INFO logs (orbax's) stay out of the output unless `--verbosity` asks.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

USAGE_ERROR = 2  # Exit status of a user error (as for a bad flag).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, app.UsageError)

_TRACEBACK = flags.DEFINE_bool("traceback", False, "on an error, show the whole traceback")


def message(error: BaseException) -> str:
    """The error's own words (a KeyError's str() would quote them)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def fail(error: BaseException | str) -> None:
    """Print `error: ...` on stderr and exit with the usage-error status."""
    text = error if isinstance(error, str) else message(error)
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)`, quiet library logs, and user errors as one line."""

    @functools.wraps(main)
    def guarded(argv: Sequence[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as error:
            if _TRACEBACK.value or os.environ.get("TRANSFORMER_TRACEBACK"):
                raise
            fail(error)

    app.run(guarded)
