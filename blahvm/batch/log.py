"""One line per event, to syslog (the batch-cluster convention) or to the site's log file.

Hooks never write chatter to stdout: esub's stdout feeds eexec, a PBS prologue's lands in the job's
output, elim's is its protocol. Each line names the hook, the batch job id, the user, the VO and the
guest, so an admin can follow one job across submit and execution hosts.
"""

from __future__ import annotations

import os
import time

from blahvm.errors import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional


def _field(name: str, value: "Optional[str]") -> str:
    if value is None:
        return ""
    # user-controlled text stays on one line and cannot forge fields
    forging = not value.isprintable() or any(c.isspace() or c in "='\"" for c in value)
    return f" {name}={value!r}" if forging else f" {name}={value}"


def format_event(hook: str, message: str, job_id=None, user=None, vo=None, guest=None) -> str:
    fields = "".join(_field(k, v) for k, v in (("job", job_id), ("user", user), ("vo", vo), ("guest", guest)))
    return f"{hook}:{fields} {printable(' '.join(str(message).split()))}"


def log_event(hook: str, message: str, job_id=None, user=None, vo=None, guest=None,
              log_file: "Optional[str]" = None) -> None:
    """Log one event; never raises (a hook must not fail because its log is unwritable)."""
    line = format_event(hook, message, job_id, user, vo, guest)
    try:
        if log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{stamp} blahvm[{os.getpid()}] {line}\n".encode("utf-8", "replace"))
            finally:
                os.close(fd)
        else:
            import syslog

            syslog.openlog("blahvm", syslog.LOG_PID, syslog.LOG_DAEMON)
            syslog.syslog(syslog.LOG_INFO, line)
    except OSError:
        pass
