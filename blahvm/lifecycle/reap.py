"""``reap``: remove guests, clones and run dirs that no live job owns, and close dead entries.

A guest is reaped only if it carries readable blahvm metadata naming this host and this
installation's ledger; a volume or run dir only if it has blahvm's naming and sits in this
installation's pool or run dir. Entries are claimed with compare-and-set, so a reap never
fights a prologue or epilogue that is working on the same job.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable, List, Set, Tuple

from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import HypervisorError
from blahvm.hypervisor.storage import ClonePool
from blahvm.jobshare import leftovers, release, share_root
from blahvm.ledger import Entry, Ledger, LedgerError, State, owner_alive
from blahvm.lifecycle import templates
from blahvm.lifecycle._common import clone_pool, connect, dismantle, is_run_dir
from blahvm.lifecycle.accounting import collect
from blahvm.lifecycle.results import ReapReport
from blahvm.lifecycle.static import clean_free_guests, is_static_lease, static_guests, take_apart
from blahvm.model import Outcome, SiteConfig

_PREPARING = (State.RESERVED, State.CLONING, State.BOOTING)
_UP = ("running", "blocked", "paused")


def reap(config: SiteConfig, dry_run: bool = False) -> ReapReport:
    """Clean up after crashes; with ``dry_run`` only report what would be removed."""
    try:
        with Ledger(config.host) as ledger, connect(config) as conn:
            # what closing the dead entries removed counts as much as the orphans found after
            closed, guests_gone, volumes, run_dirs = _close_dead_entries(config, ledger, conn, dry_run)
            live = [entry for entry in ledger.live() if entry.job_id not in closed]
            listed = guests.list_blahvm_guests(conn)
            # a dry run (also behind `blahvm guests`) only looks: it never makes the pool
            pool = ClonePool.find(conn, config.hypervisor.pool) if dry_run else clone_pool(config, conn)
            volume_names = [volume.name for volume in pool.list_volumes()] if pool else []
            children = _run_dir_children(config)
            # a live maker's guest, volume and run dir are its own. Asked after they were listed: a
            # maker's scratch dir is made before them and goes after them, so none is taken for an orphan
            making = templates.being_made(config)
            orphans = _orphan_guests(config, listed, live, static_guests(config) | making)
            returned = clean_free_guests(config, conn, live, dry_run)
            orphan_volumes = _orphan_volumes(config, volume_names, live, making)
            orphan_run_dirs = _orphan_run_dirs(config, children, live, making)
            # a template maker or a restoring prepare killed midway: its scratch dir or the job's save file
            template_files = templates.leftovers(config, {entry.guest for entry in live if entry.guest})
            # a job's directory still mounted after a crash: found in /proc/self/mountinfo
            shares = leftovers(share_root(config.host.run_dir), _owned_prefixes(config, live))
            if not dry_run:
                for name in orphans:
                    guests.destroy_and_undefine(conn, name)
                for volume in orphan_volumes:
                    pool.delete_volume(volume)
                for path in orphan_run_dirs:
                    dismantle(config, conn, None, (), path)
                for guest in shares:
                    release(share_root(config.host.run_dir), guest)
                templates.remove_leftovers(template_files)
            guests_gone += orphans
            volumes += orphan_volumes
            run_dirs += orphan_run_dirs
    except (HypervisorError, LedgerError, OSError) as error:
        return ReapReport(Outcome.RETRY_ELSEWHERE, f"reap: {error}", dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    message = (
        f"reap {verb} {len(guests_gone)} guests, {len(volumes)} volumes, {len(run_dirs)} run dirs; "
        f"{'would close' if dry_run else 'closed'} {len(closed)} entries"
    )
    if template_files:
        message += f"; {'would remove' if dry_run else 'removed'} {len(template_files)} unfinished template files"
    if shares:
        message += f"; {'would unmount' if dry_run else 'unmounted'} {len(shares)} job directories"
    if returned:
        message += f"; {'would return' if dry_run else 'returned'} static guests clean: {', '.join(returned)}"
    return ReapReport(Outcome.OK, message, dry_run, tuple(guests_gone), tuple(volumes), tuple(run_dirs), tuple(closed))


def _is_dead(conn: Connection, entry: Entry) -> bool:
    """Its guest vanished, or its owner died before handing the guest over (or while taking it apart)."""
    if entry.state in _PREPARING or entry.state is State.TEARING_DOWN:
        return not owner_alive(entry)
    return entry.guest is None or guests.domain_state(conn, entry.guest) not in _UP


def _close_dead_entries(config: SiteConfig, ledger: Ledger, conn: Connection, dry_run: bool) -> tuple:
    """The job ids closed, and the guests, volumes and run dirs that closing them removed.

    A dry run removes nothing here: the things of the entries it would close show up as orphans after.
    """
    closed: List[str] = []
    removed: Tuple[List[str], List[str], List[str]] = ([], [], [])
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
        had_run_dir = bool(claimed.run_dir) and os.path.isdir(claimed.run_dir)
        claimed = collect(ledger, conn, claimed)  # a guest still up gives its figures; a gone one, a note
        done = take_apart(config, conn, claimed)
        if done.guest_removed and not is_static_lease(config, claimed):  # a leased guest is returned, not removed
            removed[0].append(claimed.guest)
        removed[1].extend(done.volumes_removed)
        if had_run_dir and not os.path.isdir(claimed.run_dir):
            removed[2].append(claimed.run_dir)
        reason = "guest vanished" if entry.state is State.RUNNING else f"owner died in {entry.state}"
        if ledger.close(entry.job_id, Outcome.RETRY_ELSEWHERE, f"reaped: {reason}", expected_version=claimed.version):
            closed.append(entry.job_id)
    return (closed, *removed)


def _orphan_guests(config: SiteConfig, listed: list, live: List[Entry], static: frozenset) -> List[str]:
    """Guests made here by this installation (its ledger) that no live entry owns. A guest of another
    installation on the same host (a demo beside production, a test site) is never this reap's to remove."""
    owned = {entry.guest for entry in live} | static  # a site's static guest is never undefined
    here = socket.gethostname()
    ours = (None, config.host.state_dir)  # None: made before guests named their ledger
    return [
        guest.name
        for guest in listed
        if guest.name not in owned and guest.metadata.host == here and guest.metadata.ledger in ours
    ]


def _owned_prefixes(config: SiteConfig, live: List[Entry], making: frozenset = frozenset()) -> Set[str]:
    # A guest's volumes all start with its name; a live entry in "reserved" has recorded none yet.
    # Both namings count: a job prepared before names carried the installation keeps its legacy name.
    prefixes = {entry.guest for entry in live if entry.guest} | set(making)
    for entry in live:
        prefixes.update(naming.guest_names(entry.job_id, config.host.state_dir))
    return prefixes


def _orphan_volumes(
    config: SiteConfig, names: Iterable[str], live: List[Entry], making: frozenset = frozenset()
) -> List[str]:
    owned = {volume for entry in live for volume in entry.volumes}
    prefixes = _owned_prefixes(config, live, making)
    return [
        name
        for name in names
        if name.startswith(naming.PREFIX)
        and name not in owned
        and not any(name == p + ".qcow2" or name.startswith(p + "-") for p in prefixes)
    ]


def _run_dir_children(config: SiteConfig) -> List[str]:
    try:
        return sorted(os.listdir(config.host.run_dir))
    except FileNotFoundError:
        return []


def _orphan_run_dirs(config: SiteConfig, children: List[str], live: List[Entry],
                     making: frozenset = frozenset()) -> List[str]:
    owned = _owned_prefixes(config, live, making)
    paths = [os.path.join(config.host.run_dir, child) for child in children if child not in owned]
    return [path for path in paths if is_run_dir(config, path) and os.path.isdir(path)]
