"""``follow``: the job's guest paused while the batch system has its starter stopped, resumed with it.

A batch system suspends a job by stopping the processes it knows (SIGSTOP, or SIGTSTP then SIGSTOP):
blahvm's starter on the host, never the guest, which is libvirt's. ``follow`` runs as root beside the
job and mirrors the starters' state onto the guest: while any of them is stopped the guest is paused
(no CPU time passes in it), and it runs again once none is. It reads ``/proc``; it needs no hook of
the batch system's beyond one that starts it with the starters' pids.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Optional

from blahvm.hypervisor import guests, pausing
from blahvm.hypervisor.errors import HypervisorError, SpecError
from blahvm.ledger import Ledger, LedgerError, State, process_start_time
from blahvm.lifecycle._common import connect
from blahvm.lifecycle.suspend import SuspendResult
from blahvm.model import Outcome, SiteConfig

DEFAULT_POLL = 0.2  # seconds between looks: how long a stopped job's guest may still run


def stopped_state(stat: bytes) -> Optional[bool]:
    """Whether a ``/proc/PID/stat`` line is of a process stopped by a signal; None for a zombie (pure)."""
    state = stat[stat.rindex(b")") + 2 :].split()[0]
    if state == b"Z":
        return None
    return state == b"T"  # 't' is a tracer's stop, not the batch system's


def _look(pid: int, start: int) -> Optional[bool]:
    """Stopped or not; None once the process is gone (or its pid is another process's now)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat = stream.read()
    except OSError:
        return None
    if int(stat[stat.rindex(b")") + 2 :].split()[19]) != start:
        return None
    return stopped_state(stat)


def follow(
    config: SiteConfig,
    job_id: str,
    pids: Iterable[int],
    *,
    poll: float = DEFAULT_POLL,
    should_stop: Callable[[], bool] = lambda: False,
) -> SuspendResult:
    """Pause the job's guest while any of ``pids`` is stopped; return once all have exited (or the guest
    is gone, or ``should_stop()``). A guest it paused is resumed before it returns. Runs as root."""
    verb = "follow"
    starts: Dict[int, int] = {}
    for pid in pids:
        start = process_start_time(pid)
        if start is not None:  # else already gone: nothing of it to follow
            starts[int(pid)] = start
    try:
        with Ledger(config.host) as ledger:
            entry = ledger.get(job_id)
        if entry is None or not entry.live or entry.guest is None or entry.state is not State.RUNNING:
            return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: no running guest", job_id)
        paused, mine = 0, False
        with connect(config) as conn:
            state = guests.domain_state(conn, entry.guest)
            while starts and state is not None and not should_stop():
                looks = {pid: _look(pid, start) for pid, start in starts.items()}
                starts = {pid: start for pid, start in starts.items() if looks[pid] is not None}
                want_paused = any(looks.values())
                # only a pause of its own is undone: one an admin made (blahvm suspend) stays
                if want_paused and not mine and state != "paused":
                    state, mine = pausing.pause(conn, entry.guest), True
                    paused += 1
                elif not want_paused and mine:
                    state, mine = pausing.resume(conn, entry.guest), False
                time.sleep(poll)
            if mine:  # never leave paused what this follow paused
                state = pausing.resume(conn, entry.guest)
    except SpecError as error:
        return SuspendResult(Outcome.FAIL_JOB, f"{verb} {job_id}: {error}", job_id)
    except (HypervisorError, LedgerError, OSError) as error:
        return SuspendResult(Outcome.RETRY_ELSEWHERE, f"{verb} {job_id}: {error}", job_id)
    gone = "its guest is gone" if state is None else "its starters have exited" if not starts else "told to stop"
    return SuspendResult(Outcome.OK, f"job {job_id}: {gone}; guest paused {paused} times", job_id, state or "")
