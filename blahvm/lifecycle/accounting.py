"""blahvm's own record of what each job's guest used, whatever the batch system.

``collect`` reads the guest's statistics into its ledger entry just before the guest is destroyed
(teardown, reap); ``accounting`` gives one ``AccountingRecord`` per closed run. Provisioning (from the
reservation until the guest is running) is kept apart from the run itself, as LSF's PROV state is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import attrs

from blahvm.hypervisor import stats
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import HypervisorError
from blahvm.ledger import Consumed, Entry, Ledger, LedgerError, State
from blahvm.model import Outcome, SiteConfig

GONE = "no statistics: the guest was gone or stopped before they were read (CPU, memory and disk figures lost)"


@attrs.frozen
class AccountingRecord:
    """One closed run of a job on this host. Figures the hypervisor could not give are None (``note`` says why).

    ``provision_seconds``: from the slot's reservation until the guest was running (clone, boot or restore,
    agent ready). ``wall_seconds``: from then until its teardown began (suspended time included).
    """

    job_id: str
    user: str
    vo: Optional[str]
    environment: str
    outcome: Optional[Outcome]
    reason: Optional[str]
    started: float  # the reservation, seconds since the epoch
    closed: float
    provision_seconds: float
    wall_seconds: float
    cpu_seconds: Optional[float]
    vcpu_seconds: Optional[float]
    max_memory_bytes: Optional[int]
    disk_read_bytes: Optional[int]
    disk_write_bytes: Optional[int]
    note: Optional[str] = None
    queue: Optional[str] = None  # None for runs recorded by a blahvm before queues were kept
    vcpus: int = 1


def consumed_of(usage: Optional[stats.DomainUsage], problem: Optional[str] = None) -> Consumed:
    """The ledger's record of a usage read from the hypervisor, or of why there is none."""
    if usage is None:
        return Consumed(note=GONE if problem is None else f"statistics could not be read: {problem}")
    return Consumed(
        cpu_seconds=usage.cpu_seconds,
        vcpu_seconds=usage.vcpu_seconds,
        max_memory=usage.memory_bytes,
        disk_read=usage.disk_read_bytes,
        disk_write=usage.disk_write_bytes,
    )


def collect(ledger: Ledger, conn: Connection, entry: Entry) -> Entry:
    """Read the guest's usage into the entry before the guest is destroyed; the entry as it now is (a
    new version). Never raises for the hypervisor: accounting must not keep a guest alive. Figures
    already recorded are never replaced by none (a teardown retried after its guest was destroyed)."""
    problem = None
    usage = None
    if entry.guest:
        try:
            usage = stats.domain_usage(conn, entry.guest)
        except HypervisorError as error:
            problem = str(error)
    consumed = consumed_of(usage, problem)
    if consumed.known or not entry.consumed.known:
        ledger.record_usage(entry.job_id, consumed)
    return ledger.get(entry.job_id) or entry


def record_of(entry: Entry) -> AccountingRecord:
    """The accounting record of a closed entry (pure)."""
    end = entry.closed if entry.closed is not None else entry.updated
    stopping = entry.entered(State.TEARING_DOWN) or end
    running = entry.entered(State.RUNNING)
    if running is None:  # never ran: all of it was provisioning
        provision, wall = stopping - entry.created, 0.0
    else:
        provision, wall = running - entry.created, stopping - running
    used = entry.consumed
    return AccountingRecord(
        job_id=entry.job_id,
        user=entry.user,
        vo=entry.vo,
        environment=entry.environment,
        outcome=entry.outcome,
        reason=entry.reason,
        started=entry.created,
        closed=end,
        provision_seconds=max(provision, 0.0),
        wall_seconds=max(wall, 0.0),
        cpu_seconds=used.cpu_seconds,
        vcpu_seconds=used.vcpu_seconds,
        max_memory_bytes=None if used.max_memory is None else int(used.max_memory),
        disk_read_bytes=used.disk_read,
        disk_write_bytes=used.disk_write,
        note=used.note,
        queue=entry.queue,
        vcpus=entry.vcpus,
    )


@attrs.frozen
class AccountingReport:
    outcome: Outcome
    message: str
    records: Tuple[AccountingRecord, ...] = ()


def accounting(config: SiteConfig, since: float = 0.0, job_id: Optional[str] = None) -> AccountingReport:
    """One record per run closed on this host at or after ``since`` (seconds since the epoch), oldest first;
    with ``job_id``, only that job's runs (an epilogue reporting its job's usage to the batch system).

    Runs as root (the ledger is root's); needs no hypervisor. ``RETRY_ELSEWHERE`` if the ledger cannot be read.
    """
    try:
        with Ledger(config.host) as ledger:
            records = tuple(record_of(entry) for entry in ledger.closed_since(since, job_id))
    except (LedgerError, OSError) as error:
        return AccountingReport(Outcome.RETRY_ELSEWHERE, f"accounting: {error}")
    return AccountingReport(Outcome.OK, f"accounting: {len(records)} runs", records)
