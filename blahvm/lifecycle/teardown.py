"""``teardown``: nothing of the job's guest is left afterwards, whatever state it was in."""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

from blahvm.hypervisor import guests
from blahvm.hypervisor.errors import HypervisorError, MetadataError, SpecError
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
                whose = _not_ours(config, conn, names.guest)
                if whose:  # another installation's guest of the same name (reap's rule): never this teardown's
                    dismantle(config, conn, None, (), names.run_dir)
                    return TeardownResult(Outcome.OK, f"job {job_id}: guest {names.guest} {whose}: left alone", job_id)
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


def _not_ours(config: SiteConfig, conn, name: str) -> Optional[str]:
    """Why the domain ``name`` is not this installation's to remove (None: it is, or it does not exist).
    As reap: its blahvm metadata must name this host and this state dir (or no ledger: made before
    guests named theirs)."""
    if guests.domain_state(conn, name) is None:
        return None
    try:
        meta = guests.guest_metadata(conn, name)
    except MetadataError:
        return "has damaged blahvm metadata"
    if meta is None:
        return "carries no blahvm metadata"
    if meta.host != socket.gethostname():
        return f"was made on host {meta.host}"
    if meta.ledger not in (None, config.host.state_dir):
        return f"belongs to the installation whose state dir is {meta.ledger}"
    return None
