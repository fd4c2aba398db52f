"""``reap``: remove guests, clones and run dirs that no live job owns, and close dead entries.

A guest is reaped only if it carries readable blahvm metadata naming this host and this
installation's ledger; a volume or run dir only if it has blahvm's naming and sits in this
installation's pool or run dir. Entries are claimed with compare-and-set, so a reap never
fights a prologue or epilogue that is working on the same job.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable, List, Set

from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import HypervisorError
from blahvm.hypervisor.storage import ClonePool
from blahvm.ledger import Entry, Ledger, LedgerError, State, owner_alive
from blahvm.lifecycle._common import clone_pool, connect, dismantle, is_run_dir
from blahvm.lifecycle.results import ReapReport
from blahvm.lifecycle.static import clean_free_guests, static_guests, take_apart
from blahvm.model import Outcome, SiteConfig

_PREPARING = (State.RESERVED, State.CLONING, State.BOOTING)
_UP = ("running", "blocked", "paused")


def reap(config: SiteConfig, dry_run: bool = False) -> ReapReport:
    """Clean up after crashes; with ``dry_run`` only report what would be removed."""
    try:
        with Ledger(config.host) as ledger, connect(config) as conn:
            closed = _close_dead_entries(config, ledger, conn, dry_run)
            live = [entry for entry in ledger.live() if entry.job_id not in closed]
            guests_gone = _orphan_guests(config, conn, live, static_guests(config))
            returned = clean_free_guests(config, conn, live, dry_run)
            # a dry run (also behind `blahvm guests`) only looks: it never makes the pool
            pool = ClonePool.find(conn, config.hypervisor.pool) if dry_run else clone_pool(config, conn)
            volumes = _orphan_volumes((volume.name for volume in pool.list_volumes()), live) if pool else []
            run_dirs = _orphan_run_dirs(config, live)
            if not dry_run:
                for name in guests_gone:
                    guests.destroy_and_undefine(conn, name)
                for volume in volumes:
                    pool.delete_volume(volume)
                for path in run_dirs:
                    dismantle(config, conn, None, (), path)
    except (HypervisorError, LedgerError, OSError) as error:
        return ReapReport(Outcome.RETRY_ELSEWHERE, f"reap: {error}", dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    message = (
        f"reap {verb} {len(guests_gone)} guests, {len(volumes)} volumes, {len(run_dirs)} run dirs; "
        f"{'would close' if dry_run else 'closed'} {len(closed)} entries"
    )
    if returned:
        message += f"; {'would return' if dry_run else 'returned'} static guests clean: {', '.join(returned)}"
    return ReapReport(Outcome.OK, message, dry_run, tuple(guests_gone), tuple(volumes), tuple(run_dirs), tuple(closed))


def _is_dead(conn: Connection, entry: Entry) -> bool:
    """Its guest vanished, or its owner died before handing the guest over (or while taking it apart)."""
    if entry.state in _PREPARING or entry.state is State.TEARING_DOWN:
        return not owner_alive(entry)
    return entry.guest is None or guests.domain_state(conn, entry.guest) not in _UP


def _close_dead_entries(config: SiteConfig, ledger: Ledger, conn: Connection, dry_run: bool) -> List[str]:
    closed = []
    for entry in ledger.live():
        if not _is_dead(conn, entry):
            continue
        if dry_run:
            closed.append(entry.job_id)
            continue
        claimed = ledger.transition(
            entry.job_id, entry.state, State.TEARING_DOWN, expected_version=entry.version, pid=os.getpid()
        )
        if claimed is None:
            continue  # someone else is working on it
        take_apart(config, conn, claimed)
        reason = "guest vanished" if entry.state is State.RUNNING else f"owner died in {entry.state}"
        if ledger.close(entry.job_id, Outcome.RETRY_ELSEWHERE, f"reaped: {reason}", expected_version=claimed.version):
            closed.append(entry.job_id)
    return closed


def _orphan_guests(config: SiteConfig, conn: Connection, live: List[Entry], static: frozenset) -> List[str]:
    """Guests made here by this installation (its ledger) that no live entry owns. A guest of another
    installation on the same host (a demo beside production, a test site) is never this reap's to remove."""
    owned = {entry.guest for entry in live} | static  # a site's static guest is never undefined
    here = socket.gethostname()
    ours = (None, config.host.state_dir)  # None: made before guests named their ledger
    return [
        guest.name
        for guest in guests.list_blahvm_guests(conn)
        if guest.name not in owned and guest.metadata.host == here and guest.metadata.ledger in ours
    ]


def _owned_prefixes(live: List[Entry]) -> Set[str]:
    # A guest's volumes all start with its name; a live entry in "reserved" has recorded none yet.
    prefixes = {entry.guest for entry in live if entry.guest}
    prefixes.update(naming.guest_name(entry.job_id) for entry in live)
    return prefixes


def _orphan_volumes(names: Iterable[str], live: List[Entry]) -> List[str]:
    owned = {volume for entry in live for volume in entry.volumes}
    prefixes = _owned_prefixes(live)
    return [
        name
        for name in names
        if name.startswith(naming.PREFIX)
        and name not in owned
        and not any(name == p + ".qcow2" or name.startswith(p + "-") for p in prefixes)
    ]


def _orphan_run_dirs(config: SiteConfig, live: List[Entry]) -> List[str]:
    try:
        children = sorted(os.listdir(config.host.run_dir))
    except FileNotFoundError:
        return []
    owned = _owned_prefixes(live)
    paths = [os.path.join(config.host.run_dir, child) for child in children if child not in owned]
    return [path for path in paths if is_run_dir(config, path) and os.path.isdir(path)]
