"""Run a hook's body so that whatever happens, the batch system gets a defined exit code."""

from __future__ import annotations

import os
import sys

from blahvm.batch.log import log_event
from blahvm.errors import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional


def run_hook(hook: str, body: "Callable[[], int]", on_error: int, log_file: "Optional[str]" = None,
             stderr: bool = True) -> int:
    """``body()``'s exit code; an unexpected exception becomes one log line (and one stderr line
    when ``stderr``) and ``on_error``. ``BLAHVM_DEBUG`` is deliberately not honoured here: hooks
    take nothing from the environment they were started with."""
    try:
        return body()
    except KeyboardInterrupt:
        return on_error
    except SystemExit as exit:  # a body may sys.exit(); keep its code if it is a number
        return exit.code if isinstance(exit.code, int) else on_error
    except Exception as error:
        message = f"internal error: {type(error).__name__}: {error}"
        log_event(hook, message, log_file=log_file)
        if stderr:
            try:
                os.write(2, f"blahvm {hook}: {printable(' '.join(message.split()))}\n".encode("utf-8", "replace"))
            except OSError:
                pass
        return on_error


def exit_with(code: int) -> None:
    """Flush and leave with ``code`` (a hook's last act)."""
    try:
        sys.stdout.flush()
    finally:
        sys.exit(code)
