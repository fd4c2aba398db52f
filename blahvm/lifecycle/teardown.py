"""``teardown``: nothing of the job's guest is left afterwards, whatever state it was in."""

from __future__ import annotations

import os
import socket
import time
from typing import List, Optional, Tuple

from blahvm.hypervisor import guests
from blahvm.hypervisor.errors import HypervisorError, MetadataError, SpecError
from blahvm.ledger import Ledger, LedgerError, State
from blahvm.lifecycle._common import Dismantled, all_job_names, connect, dismantle
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
        namings = all_job_names(config, job_id)  # the current names, then those before names carried the installation
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
                done, spared = _dismantle_by_name(config, conn, namings)
                if spared and not done.guest_removed:
                    return TeardownResult(Outcome.OK, f"job {job_id}: {'; '.join(spared)}: left alone", job_id)
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


def _dismantle_by_name(config: SiteConfig, conn, namings) -> Tuple[Dismantled, List[str]]:
    """Take apart what each naming of the job names, where no live entry records it (a crash before the
    ledger knew, an epilogue run twice); a guest another installation made is left alone (reap's rule)."""
    removed, volumes, spared = False, [], []
    for names in namings:
        whose = _not_ours(config, conn, names.guest)
        if whose:
            spared.append(f"guest {names.guest} {whose}")
            dismantle(config, conn, None, (), names.run_dir)
            continue
        done = dismantle(config, conn, names.guest, (names.disk, names.scratch), names.run_dir)
        removed = removed or done.guest_removed
        volumes.extend(done.volumes_removed)
    return Dismantled(removed, tuple(volumes)), spared


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
