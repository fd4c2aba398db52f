"""The guest's usage charged to its OpenPBS job: ``resources_used.cput`` and ``mem`` as the hook sets them.

The mom measures the job's processes on the host only (the job starter: tenths of a second); the guest's
QEMU is libvirt's child, in no process tree of the job's. At ``execjob_epilogue``, once ``teardown`` has
read the guest's statistics into the ledger (``blahvm.lifecycle.accounting``), the hook sets ``cput`` and
``mem`` to the mom's own figures plus the guest's. OpenPBS 23.06 keeps them: a resource a mom hook sets is
flagged ``ATR_VFLAG_HOOK`` and ``mom_set_use`` (``src/resmom/linux/mom_mach.c``) no longer polls it, and
``send_obit`` (``src/resmom/catch_child.c``) reads the epilogue hook's results into the job before the
obit carries ``resources_used`` to the server.

``walltime``: the mom counts it from the job's start without the time it was suspended (``stop_walltime``
at a suspend) but only when it polls, so a job shorter than a polling interval ends with 0 (observed:
``00:00:00`` for jobs of 5-10 s). The hook sets the larger of the mom's figure and the guest's run
(``wall_seconds``: from the guest running until its teardown) less the time the job was suspended, which
the suspend and resume hooks record here (``Suspended``) since blahvm's ledger counts suspended time in.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Optional

import attrs

from blahvm.lifecycle.accounting import AccountingRecord
from blahvm.model import Outcome
from blahvm.quantities import QuantityError


@attrs.frozen
class Charged:
    """``resources_used`` for the job: CPU seconds and memory in KiB (PBS's ``kb``)."""

    cput_seconds: int
    mem_kb: int


def run_record(records: Iterable[AccountingRecord], since: Optional[float]) -> Optional[AccountingRecord]:
    """The record of the run that just ended: the latest closed at or after ``since`` (the job's start,
    seconds since the epoch; None: any). An earlier run of a requeued job is never charged again."""
    found = None
    for record in records:
        if since is not None and record.closed < since:
            continue
        if found is None or record.closed >= found.closed:
            found = record
    return found


def charged(record: AccountingRecord, host_cput_seconds: int = 0, host_mem_bytes: int = 0) -> Optional[Charged]:
    """The job's figures: the mom's own (its processes on the host) plus the guest's, whose QEMU ran at the
    same time (so memory adds up too). None when the guest's statistics were lost (``record.note``)."""
    if record.cpu_seconds is None:
        return None
    cput = max(host_cput_seconds, 0) + int(math.ceil(record.cpu_seconds))
    guest_memory = record.max_memory_bytes or 0
    return Charged(cput_seconds=cput, mem_kb=int(math.ceil((max(host_mem_bytes, 0) + guest_memory) / 1024)))


def walltime_seconds(record: AccountingRecord, suspended_seconds: float, host_walltime_seconds: int = 0) -> int:
    """The job's walltime: its guest's run less the time it was suspended, or the mom's figure if larger."""
    guest = int(round(max(record.wall_seconds - max(suspended_seconds, 0.0), 0.0)))
    return max(guest, max(host_walltime_seconds, 0))


# -- the time a job spent suspended, kept by execjob_postsuspend / execjob_preresume ----------------

SUSPENSIONS = "pbs-suspensions"  # under host.state_dir (root's)


@attrs.frozen
class Suspended:
    """Seconds a job has spent suspended, and since when it is suspended now (None: running)."""

    total: float = 0.0
    since: Optional[float] = None

    def paused(self, now: float) -> "Suspended":
        return self if self.since is not None else attrs.evolve(self, since=now)

    def resumed(self, now: float) -> "Suspended":
        return self if self.since is None else Suspended(total=self.total + max(now - self.since, 0.0))

    def seconds(self, now: float) -> float:
        return self.total + (max(now - self.since, 0.0) if self.since is not None else 0.0)


def _suspension_path(state_dir: str, job_id: str) -> str:
    return os.path.join(state_dir, SUSPENSIONS, job_id.encode("utf-8", "surrogatepass").hex())


def read_suspended(state_dir: str, job_id: str) -> Suspended:
    """What was recorded for the job; nothing (never suspended, or unreadable) is no suspension."""
    try:
        with open(_suspension_path(state_dir, job_id)) as stream:
            data = json.load(stream)
        since = data.get("since")
        return Suspended(total=max(float(data.get("total", 0.0)), 0.0), since=None if since is None else float(since))
    except (OSError, ValueError, TypeError, AttributeError):
        return Suspended()


def write_suspended(state_dir: str, job_id: str, suspended: Suspended) -> None:
    directory = os.path.join(state_dir, SUSPENSIONS)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = _suspension_path(state_dir, job_id)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as stream:
        json.dump({"total": suspended.total, "since": suspended.since}, stream)
    os.replace(path + ".new", path)


def forget_suspended(state_dir: str, job_id: str) -> None:
    try:
        os.unlink(_suspension_path(state_dir, job_id))
    except OSError:
        pass


def _seconds(value) -> int:
    from blahvm.batch.pbs import parse_pbs_duration

    if value is None or str(value) == "":
        return 0
    try:
        return int(parse_pbs_duration(str(value)))
    except QuantityError:
        return 0


def _bytes(value) -> int:
    from blahvm.batch.pbs import parse_pbs_size

    if value is None or str(value) == "":
        return 0
    try:
        return int(parse_pbs_size(str(value)))
    except QuantityError:
        return 0


def charge_job(pbs, job, site, now: Optional[float] = None) -> str:
    """Set ``job.resources_used`` cput, mem and walltime from the guest's record in the ledger and the time
    the job was suspended; one line saying what."""
    from blahvm.lifecycle import accounting

    job_id = str(job.id)
    report = accounting(site, job_id=job_id)
    if report.outcome is not Outcome.OK:
        return report.message
    start = getattr(job, "stime", None)
    try:
        since = float(start) if start not in (None, "") else None
    except (TypeError, ValueError):
        since = None
    record = run_record(report.records, since)
    if record is None:
        return f"job {job_id}: no guest run recorded: resources_used left as the mom measured"
    used = getattr(job, "resources_used", None)
    if used is None:
        return f"job {job_id}: no resources_used to set"
    suspended = read_suspended(site.host.state_dir, job_id).seconds(time.time() if now is None else now)
    walltime = walltime_seconds(record, suspended, _seconds(used["walltime"]))
    used["walltime"] = pbs.duration(walltime)
    figures = charged(record, _seconds(used["cput"]), _bytes(used["mem"]))
    if figures is None:
        return (f"job {job_id}: walltime={walltime}; {record.note or 'no statistics of its guest'}: cput and mem "
                "left as the mom measured")
    used["cput"] = pbs.duration(figures.cput_seconds)
    used["mem"] = pbs.size(f"{figures.mem_kb}kb")
    return (f"job {job_id}: resources_used cput={figures.cput_seconds} mem={figures.mem_kb}kb walltime={walltime} "
            f"(guest {record.cpu_seconds:.2f} CPU s, {suspended:.0f} s suspended)")
