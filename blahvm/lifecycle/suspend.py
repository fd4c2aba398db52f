"""``suspend`` and ``resume``: the job's guest paused and resumed with its job, through the hypervisor.

A paused guest keeps its memory, disks and agent connection; no CPU time passes in it, so its payload
makes no progress, and after ``resume`` it goes on where it was (its exit code and output unchanged).
"""

from __future__ import annotations

import attrs

from blahvm.hypervisor import pausing
from blahvm.hypervisor.errors import HypervisorError, SpecError
from blahvm.ledger import Ledger, LedgerError, State
from blahvm.lifecycle._common import connect
from blahvm.model import Outcome, SiteConfig


@attrs.frozen
class SuspendResult:
    """``OK`` when the guest is in the state asked for (also when it already was)."""

    outcome: Outcome
    message: str
    job_id: str
    state: str = ""  # the guest's state afterwards: paused, running, ... ('' if it has none)


def suspend(config: SiteConfig, job_id: str) -> SuspendResult:
    """Pause the job's running guest (root, on its execution host). Idempotent."""
    return _switch(config, job_id, pausing.pause, "paused")


def resume(config: SiteConfig, job_id: str) -> SuspendResult:
    """Resume the job's paused guest (root, on its execution host). Idempotent."""
    return _switch(config, job_id, pausing.resume, "running")


def _switch(config: SiteConfig, job_id: str, action, wanted: str) -> SuspendResult:
    verb = "suspend" if wanted == "paused" else "resume"
    try:
        with Ledger(config.host) as ledger:
            entry = ledger.get(job_id)
        if entry is None or not entry.live or entry.guest is None or entry.state is not State.RUNNING:
            # nothing to pause: a job whose guest is not up (yet, or any more) is the batch system's alone
            what = "no running guest" if entry is None or not entry.live else f"its guest is {entry.state}"
            return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: {what}", job_id)
        with connect(config) as conn:
            state = action(conn, entry.guest)
    except SpecError as error:
        return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: {error}", job_id)
    except (HypervisorError, LedgerError, OSError) as error:
        return SuspendResult(Outcome.RETRY_ELSEWHERE, f"{verb} {job_id}: {error}", job_id)
    if state is None:
        return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: its guest {entry.guest} is gone", job_id)
    if state != wanted and not (wanted == "running" and state == "blocked"):
        return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: its guest {entry.guest} is {state}", job_id,
                             state)
    return SuspendResult(Outcome.OK, f"job {job_id}: guest {entry.guest} {state}", job_id, state)
