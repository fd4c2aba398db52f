"""``bstop``/``bresume`` reach the job's guest: PRE_EXEC leaves a root ``follow`` beside each job.

volclava suspends a job by sending SIGSTOP to its process groups (``sbd.sig.c`` ``jRunSuspendAct``
-> ``jobsig`` -> ``mykillpg``) and resumes it with SIGCONT; a queue's ``JOB_CONTROLS`` command would
run as the job's user (``jobact`` -> ``postJobSetup``), who may not pause a guest. The job's process
group is led by the process that sbatchd forked for the job (``setPGid``: ``setpgid(0, getpid())``),
which runs the queue's PRE_EXEC and then becomes the job's shell; PRE_EXEC runs in that group. So
PRE_EXEC, root already, starts ``follow`` on the group's leader in a session of its own (a SIGSTOP,
SIGKILL to the job's group never reaches it): while the leader is stopped the guest is paused, it
runs again with it, and the follower ends when the job's shell exits (a pause it made is undone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Sequence

# Run in a fresh interpreter (``python -IS``), detached: argv[1] is the JSON of the import path, the
# config path, the job id and the pid to follow.
_FOLLOWER = """\
import json, sys
paths, config, job_id, pid = json.loads(sys.argv[1])
sys.path[:0] = paths
from blahvm.batch.lsf.follower import follower_main
sys.exit(follower_main(config, job_id, pid))
"""


def job_leader() -> Optional[int]:
    """The leader of this process's group when it is the job's (not this process, not init), else None."""
    leader = os.getpgrp()
    return leader if leader not in (0, 1, os.getpid()) else None


def start_follower(config_path: str, job_id: str, pid: int, paths: Optional[Sequence[str]] = None) -> Optional[str]:
    """Start the follower of ``pid`` for ``job_id``, detached; None when started, else why not."""
    argument = json.dumps([list(sys.path if paths is None else paths), config_path, job_id, pid])
    try:
        subprocess.Popen([sys.executable, "-IS", "-c", _FOLLOWER, argument], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
                         close_fds=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    except OSError as error:
        return f"cannot start the follower: {error.strerror or error}"
    return None


def follower_main(config_path: str, job_id: str, pid: int) -> int:
    """The follower's body: ``follow`` until the job's shell exits, then one log line."""
    from blahvm.batch.hook import run_hook

    return run_hook("follow", lambda: _follow(config_path, job_id, pid), on_error=1, stderr=False)


def _follow(config_path: str, job_id: str, pid: int) -> int:
    from blahvm.batch.log import log_event
    from blahvm.config import load_config
    from blahvm.lifecycle import follow
    from blahvm.model import Outcome

    config = load_config(config_path)
    result = follow(config, job_id, [pid])
    log_event("follow", result.message, job_id=job_id, log_file=config.host.log_file)
    return 0 if result.outcome is Outcome.OK else 1
