"""Tell the job's user why PRE_EXEC ended their job, in the job's own error (or output) file.

volclava runs PRE_EXEC with stdin, stdout and stderr on ``/dev/null`` and has no channel for a
message to the user: no job messages (IBM LSF's ``bpost``), no reason text in ``bjobs -l`` (only
fixed codes), and its report says only "Exited with exit code 99". What it does give PRE_EXEC is
the job's ``-e``/``-o`` path (``LSB_ERRORFILE``, ``LSB_OUTPUTFILE``, set by sbatchd's ``setJobEnv``
before the queue's PRE_EXEC runs), and when the job ends sbatchd *appends* its report to those files
(``send_results`` opens them with "a"). So one line appended there first is what the user reads
above LSF's report. It is written as the job's user (never root: the path is the user's choice) and
never through a symbolic link; a job without ``-o`` or ``-e`` gets its report by mail and the reason
stays in the log only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Optional

from blahvm.errors import printable

WRITE_TIMEOUT = 10.0  # seconds: a file on a hung network file system must not hold PRE_EXEC

# Run as the job's user: appends stdin's one line to argv[1] (argv[2]: the job id, for a directory
# given as -o/-e, where LSF writes ID.out / ID.err) without following a symbolic link, to a regular file.
_WRITER = """\
import os, stat, sys
path, name = sys.argv[1], sys.argv[2]
if path.endswith("/") or os.path.isdir(path):
    path = os.path.join(path, name)
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK, 0o600)
if not stat.S_ISREG(os.fstat(fd).st_mode):
    sys.exit(3)
os.write(fd, sys.stdin.buffer.read())
"""


def job_file(environ: Mapping[str, str]) -> Optional[str]:
    """The job's ``-e`` file, else its ``-o`` file, as an absolute path (a relative one is LSF's from the
    submission directory); None when the job has neither (LSF mails the report) (pure)."""
    for name in ("LSB_ERRORFILE", "LSB_OUTPUTFILE"):
        path = environ.get(name, "")
        if not path or path == "/dev/null" or "\0" in path:
            continue
        if path.startswith("/"):
            return path
        cwd = environ.get("LS_SUBCWD", "")
        return os.path.join(cwd, path) if cwd.startswith("/") else None
    return None


def notice_line(job_id: str, reason: str) -> str:
    """The line the user reads: one line, nothing a terminal would act on (pure)."""
    return f"blahvm: job {printable(job_id)} did not start: {printable(' '.join(str(reason).split()))}\n"


def tell_user(environ: Mapping[str, str], job_id: str, uid: int, gid: int, reason: str) -> Optional[str]:
    """Append the reason to the job's error file as ``uid``/``gid``; None when written, else why not."""
    path = job_file(environ)
    if path is None:
        return "the job has no -e or -o file (LSF mails its report)"
    suffix = ".err" if environ.get("LSB_ERRORFILE") else ".out"
    name = job_id + suffix
    as_user = {} if os.getuid() == uid else {"user": uid, "group": gid, "extra_groups": []}
    try:
        done = subprocess.run([sys.executable, "-IS", "-c", _WRITER, path, name],
                              input=notice_line(job_id, reason).encode("utf-8", "replace"), capture_output=True,
                              timeout=WRITE_TIMEOUT, cwd="/", env={"PATH": "/usr/bin:/bin"}, **as_user)
    except subprocess.TimeoutExpired:
        return f"writing {path!r} took more than {WRITE_TIMEOUT:g}s"
    except OSError as error:
        return f"cannot write {path!r}: {error.strerror or error}"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"cannot write {path!r} as uid {uid}: {printable(said[-1] if said else 'not a regular file')}"
    return None
