"""``charge``: a job's guest put into its batch job's cgroups, so the batch system counts, limits and freezes it.

The guest's QEMU is libvirtd's child, in libvirt's cgroups. A batch system that tracks a job by
cgroups places a process of its own for the job (Slurm: the extern step's placeholder, which stays
for the whole allocation); ``charge`` moves every thread of the job's QEMU into that process's
cgroups (``blahvm.jobcgroup``). From then on the batch system's accounting counts the guest's CPU
and memory, the job's memory limit binds it, suspending the job freezes it, and ending the job
kills it (before the batch system's epilogue runs: ``teardown`` then finds it gone).

Since QEMU may be killed before ``teardown`` can read its statistics, ``charge`` stays beside the job
and records the guest's usage in the ledger every ``interval`` seconds until QEMU is gone: what a
job loses is at most the last interval before the batch system killed it. It runs as root, outside
the job's cgroups itself (its caller moves it out: ``jobcgroup.leave_job``).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import attrs

from blahvm import jobcgroup
from blahvm.hypervisor import process, stats
from blahvm.hypervisor.errors import HypervisorError
from blahvm.ledger import Ledger, LedgerError, State
from blahvm.lifecycle._common import connect
from blahvm.lifecycle.accounting import consumed_of
from blahvm.model import Outcome, SiteConfig
from blahvm.quantities import Size

# What QEMU holds beyond the guest's own memory, with headroom. Measured: 274-278 MiB resident for a
# 256 MiB guest under TCG (about 22 MiB over). A job's memory limit below the guest's memory plus this
# would get the guest killed by the OOM killer.
QEMU_OVERHEAD = Size(128 * 1024 * 1024)
DEFAULT_INTERVAL = 1.0


@attrs.frozen
class ChargeResult:
    outcome: Outcome
    message: str
    job_id: str
    charged: bool = False  # whether the guest was moved into the job's cgroups


def memory_needed(guest_memory: int) -> int:
    """The least memory limit under which a guest of ``guest_memory`` bytes runs (pure)."""
    return int(guest_memory) + int(QEMU_OVERHEAD)


def limit_problem(limit: Optional[int], guest_memory: int) -> Optional[str]:
    """Why a job whose cgroup allows ``limit`` bytes cannot hold its guest; None if it can (pure)."""
    needed = memory_needed(guest_memory)
    if limit is None or limit >= needed:
        return None
    return (f"the job's memory limit {Size(limit)} is below its guest's {Size(guest_memory)} plus "
            f"{QEMU_OVERHEAD} for QEMU ({Size(needed)}), and the OOM killer would kill the guest")


def charge(
    config: SiteConfig,
    job_id: str,
    reference: int,
    *,
    interval: float = DEFAULT_INTERVAL,
    should_stop: Callable[[], bool] = lambda: False,
    report: Callable[[str], None] = lambda message: None,
) -> ChargeResult:
    """Move the job's guest into the cgroups of process ``reference`` (the batch system's own process of the
    job), then record the guest's usage every ``interval`` seconds until it is gone. Runs as root.

    ``FAIL_JOB`` when the job has no running guest or the job's memory limit is too small for it (then
    the guest is left where it was, outside the job); ``RETRY_ELSEWHERE`` when it could not be moved.
    ``report`` is told, in one line, once the guest is in the job's cgroups (the result comes at the job's end)."""
    verb = f"charge {job_id}"
    try:
        with Ledger(config.host) as ledger:
            entry = ledger.get(job_id)
        if entry is None or not entry.live or entry.guest is None or entry.state is not State.RUNNING:
            return ChargeResult(Outcome.FAIL_JOB, f"{verb}: no running guest", job_id)
        mounts = jobcgroup.mounts_here()
        places = jobcgroup.targets(jobcgroup.memberships_of(reference), mounts)
        if not places:
            return ChargeResult(Outcome.OK, f"{verb}: process {reference} is in no cgroup of a job", job_id)
        problem = limit_problem(jobcgroup.memory_limit(places, mounts), int(entry.memory))
        if problem:
            return ChargeResult(Outcome.FAIL_JOB, f"{verb}: {problem}; the guest is left outside the job", job_id)
        with connect(config) as conn:
            pid = process.qemu_pid(conn, entry.guest)
            if pid is None:
                return ChargeResult(Outcome.FAIL_JOB, f"{verb}: guest {entry.guest} has no QEMU process here", job_id)
            jobcgroup.join(pid, places)
            where = ", ".join(place.directory for place in places)
            report(f"{verb}: guest {entry.guest} (QEMU {pid}) moved into {where}")
            samples = _sample(config, job_id, entry.guest, pid, interval, should_stop, conn)
    except jobcgroup.CgroupError as error:
        return ChargeResult(Outcome.RETRY_ELSEWHERE, f"{verb}: {error}", job_id)
    except (HypervisorError, LedgerError, OSError) as error:
        return ChargeResult(Outcome.RETRY_ELSEWHERE, f"{verb}: {error}", job_id)
    return ChargeResult(Outcome.OK, f"{verb}: guest {entry.guest} (QEMU {pid}) ended with the job; "
                                    f"{samples} usage samples recorded", job_id, charged=True)


def _sample(config: SiteConfig, job_id: str, guest: str, pid: int, interval: float,
            should_stop: Callable[[], bool], conn) -> int:
    """Record the guest's usage until its QEMU is gone or its entry closes; the number of records.

    CPU and memory come from QEMU's /proc every time; the disk figures from libvirt, whose statistics ask
    QEMU's monitor, so never while the job is frozen (a frozen QEMU answers nothing until it thaws)."""
    recorded, last = 0, None
    while not should_stop():
        cpu = process.cpu_seconds_of(pid)
        if cpu is None:
            break
        if not jobcgroup.frozen(pid):
            try:
                last = stats.domain_usage(conn, guest) or last
            except HypervisorError:
                pass  # frozen meanwhile, or libvirt slow: its last figures stand
        if last is not None:
            usage = attrs.evolve(last, cpu_seconds=cpu, vcpu_seconds=process.vcpu_seconds_of(pid) or last.vcpu_seconds,
                                 memory_bytes=max(last.memory_bytes or 0, process.resident_bytes_of(pid) or 0) or None)
            with Ledger(config.host) as ledger:
                entry = ledger.get(job_id)
                if entry is None or not entry.live:
                    break
                known = entry.consumed.cpu_seconds
                if known is None or usage.cpu_seconds > known:  # teardown's own, later reading stays
                    ledger.record_usage(job_id, consumed_of(usage))
                    recorded += 1
        time.sleep(interval)
    return recorded
