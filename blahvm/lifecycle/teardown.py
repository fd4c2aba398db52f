"""``teardown``: nothing of the job's guest is left afterwards, whatever state it was in."""

from __future__ import annotations

import os
import time

from blahvm.hypervisor.errors import HypervisorError, SpecError
from blahvm.ledger import Ledger, LedgerError, State
from blahvm.lifecycle._common import connect, dismantle, job_names
from blahvm.lifecycle.accounting import collect
from blahvm.lifecycle.results import TeardownResult
from blahvm.lifecycle.static import take_apart
from blahvm.model import Outcome, SiteConfig


def teardown(config: SiteConfig, job_id: str) -> TeardownResult:
    """Destroy and undefine the guest, delete its clones, remove its run dir, free its slot.

    Idempotent: a job with nothing left is OK. Names come from the ledger when it has a live
    entry, else from the job id (a crash before the ledger knew of them still gets cleaned).
    A job the ledger never knew had nothing made for it (prepare records every name before
    making it), so it needs no hypervisor: OK even while the hypervisor is down.
    If the hypervisor cannot be reached the entry stays live (``tearing_down``) for a retry or reap.
    """
    started = time.monotonic()
    try:
        names = job_names(config, job_id)
        with Ledger(config.host) as ledger:
            if ledger.get(job_id) is None:
                return TeardownResult(Outcome.OK, f"job {job_id}: no guest was ever made for it", job_id)
        with Ledger(config.host) as ledger, connect(config) as conn:
            entry = ledger.get(job_id)
            if entry is not None and entry.live:
                entry = ledger.transition(job_id, entry.state, State.TEARING_DOWN, pid=os.getpid()) or entry
                entry = collect(ledger, conn, entry)  # libvirt forgets a guest's statistics once destroyed
                done = take_apart(config, conn, entry)  # a leased static guest is returned, not removed
                ledger.close(job_id, Outcome.OK, expected_version=entry.version)
                ledger.record_timing(job_id, "teardown", time.monotonic() - started)
            else:
                volumes = (names.disk, names.scratch)
                done = dismantle(config, conn, names.guest, volumes, names.run_dir)
    except SpecError as error:
        return TeardownResult(Outcome.FAIL_JOB, str(error), job_id)
    except HypervisorError as error:
        return TeardownResult(Outcome.RETRY_ELSEWHERE, f"teardown {job_id}: {error}", job_id)
    except (LedgerError, OSError) as error:
        return TeardownResult(Outcome.RETRY_ELSEWHERE, f"teardown {job_id}: {error}", job_id)
    seconds = time.monotonic() - started
    what = "removed its guest" if done.guest_removed else "its guest was already gone"
    return TeardownResult(
        Outcome.OK,
        f"job {job_id}: {what} in {seconds:.2f}s",
        job_id,
        guest_removed=done.guest_removed,
        volumes_removed=done.volumes_removed,
        seconds=seconds,
    )
