"""The guest's usage charged to its OpenPBS job: ``resources_used.cput`` and ``mem`` as the hook sets them.

The mom measures the job's processes on the host only (the job starter: tenths of a second); the guest's
QEMU is libvirt's child, in no process tree of the job's. At ``execjob_epilogue``, once ``teardown`` has
read the guest's statistics into the ledger (``blahvm.lifecycle.accounting``), the hook sets ``cput`` and
``mem`` to the mom's own figures plus the guest's. OpenPBS 23.06 keeps them: a resource a mom hook sets is
flagged ``ATR_VFLAG_HOOK`` and ``mom_set_use`` (``src/resmom/linux/mom_mach.c``) no longer polls it, and
``send_obit`` (``src/resmom/catch_child.c``) reads the epilogue hook's results into the job before the
obit carries ``resources_used`` to the server.

``walltime`` stays the mom's: it counts from the job's start to its end without the time it was suspended
(``stop_walltime`` at a suspend), which is the guest's run (provisioning happens at execjob_begin, before
it); blahvm's own ``wall_seconds`` includes suspended time and would charge a suspended job for it.
"""

from __future__ import annotations

import math
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


def charge_job(pbs, job, site) -> str:
    """Set ``job.resources_used`` cput and mem from the guest's record in the ledger; one line saying what."""
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
    figures = charged(record, _seconds(used["cput"]), _bytes(used["mem"]))
    if figures is None:
        return f"job {job_id}: {record.note or 'no statistics of its guest'}: resources_used left as the mom measured"
    used["cput"] = pbs.duration(figures.cput_seconds)
    used["mem"] = pbs.size(f"{figures.mem_kb}kb")
    return (f"job {job_id}: resources_used cput={figures.cput_seconds} mem={figures.mem_kb}kb "
            f"(guest {record.cpu_seconds:.2f} CPU s)")
