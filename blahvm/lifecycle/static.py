"""Static environments: lease one of the site's pre-defined guests, and return it clean.

An environment with ``guests:`` names domains the site defined, each with a snapshot
``blahvm-clean`` of its shut-off, clean state. ``prepare`` takes the lease inside the ledger's
reservation (the entry records the guest; the ledger refuses a guest another live entry holds),
reverts the guest, points its agent channel into the job's run dir, starts it and waits for the
agent. ``teardown`` and ``reap`` stop and revert it, and never undefine it. See docs/operations.md.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

from blahvm.hypervisor import guests, naming, snapshots
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import HypervisorError
from blahvm.ledger import Entry, Ledger, NoCapacity, State
from blahvm.lifecycle._bringup import BringUp, hand_over_socket, make_run_dir
from blahvm.lifecycle._common import Dismantled, Refusal, dismantle, queue_slots
from blahvm.lifecycle.results import PrepareResult
from blahvm.model import Environment, Job, Outcome, SiteConfig


def is_static_lease(config: SiteConfig, entry: Entry) -> bool:
    """blahvm names every guest it makes after its job and installation (or, before names carried the
    installation, after its job alone); any other guest in an entry is a site's, leased."""
    return entry.guest is not None and entry.guest not in naming.guest_names(entry.job_id, config.host.state_dir)


def static_guests(config: SiteConfig) -> frozenset:
    return frozenset(name for environment in config.environments.values() for name in environment.guests)


def return_clean(conn: Connection, guest: str) -> bool:
    """Stop the guest and revert it to ``blahvm-clean``, keeping it defined; False if it was not running."""
    if not snapshots.exists(conn, guest):
        return False  # the site removed it: nothing to return
    stopped = snapshots.stop(conn, guest)
    snapshots.revert_clean(conn, guest)
    return stopped


def take_apart(config: SiteConfig, conn: Connection, entry: Entry) -> Dismantled:
    """What teardown and reap do with an entry's things: a leased guest is returned clean, never undefined."""
    if not is_static_lease(config, entry):
        return dismantle(config, conn, entry.guest, entry.volumes, entry.run_dir)
    stopped = return_clean(conn, entry.guest)
    dismantle(config, conn, None, entry.volumes, entry.run_dir)
    return Dismantled(guest_removed=stopped, volumes_removed=())


def free_count(environment: Environment, live: Iterable[Entry]) -> int:
    """How many of the environment's guests no live entry holds (from the ledger alone)."""
    held = {entry.guest for entry in live}
    return sum(1 for name in environment.guests if name not in held)


def clean_free_guests(config: SiteConfig, conn: Connection, live: Iterable[Entry], dry_run: bool) -> tuple:
    """Stop and revert the static guests that run though no live entry holds them; their names."""
    held = {entry.guest for entry in live}
    running = [
        name
        for name in sorted(static_guests(config) - held)
        if guests.domain_state(conn, name) not in (None, *guests.STOPPED_STATES)
    ]
    if not dry_run:
        for name in running:
            return_clean(conn, name)
    return tuple(running)


def prepare_static(
    config: SiteConfig, job: Job, environment: Environment, ledger: Ledger, conn: Connection,
    ready_timeout: Optional[float],
) -> PrepareResult:
    """Lease a free guest of ``environment``, clean and started, its agent socket the job's user's."""
    return _Lease(config, job, environment, ledger, conn, ready_timeout).run()


class _Lease(BringUp):
    """One of the site's guests, reverted to ``blahvm-clean`` and lent to this job."""

    WHAT = "leased guest"

    def _reserve(self) -> Entry:
        """The lease, in the ledger's reservation: only guests that can be leased at all are offered."""
        problems = {name: snapshots.lease_problem(self.conn, name) for name in self.environment.guests}
        leasable = [name for name, problem in problems.items() if problem is None]
        if not leasable:
            raise Refusal(
                Outcome.RETRY_ELSEWHERE,
                f"environment {self.environment.name} has no guest to lease on this host: "
                + "; ".join(problems.values()),
            )
        env, decision = self.environment, self.job.decision
        try:  # the guest's footprint is the environment's shape, whatever the job asked for
            return self.ledger.reserve(
                self.job.job_id, self.job.user, decision.vo, env.name, env.memory, env.vcpus, lease=leasable,
                queue=decision.queue, queue_slots=queue_slots(self.config, decision.queue),
            )
        except NoCapacity as error:
            if error.resource == "static guests":
                message = f"environment {env.name}: all {len(leasable)} of its guests are leased"
                raise Refusal(Outcome.RETRY_ELSEWHERE, message) from None
            raise Refusal(Outcome.RETRY_ELSEWHERE if error.ever_fits else Outcome.FAIL_JOB, str(error)) from None

    def _bring_up(self, entry: Entry) -> PrepareResult:
        entry = self.ledger.transition(
            entry.job_id, State.RESERVED, State.BOOTING, expected_version=entry.version, run_dir=self.names.run_dir
        )
        if entry is None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {self.job.job_id} changed in the ledger while being prepared")
        started = time.monotonic()
        return_clean(self.conn, entry.guest)  # whatever ran on it since its last teardown is undone
        make_run_dir(self.config.host.run_dir, self.names.run_dir)
        snapshots.point_agent_at(self.conn, entry.guest, self.names.socket, self.names.control_socket)
        snapshots.start(self.conn, entry.guest)
        hand_over_socket(self.names, self.job, wait=self.ready_timeout is not None)
        return self._started(started)

    def _take_apart(self, entry: Entry) -> Optional[str]:
        try:
            take_apart(self.config, self.conn, entry)
        except (HypervisorError, OSError) as error:
            return str(error)
        return None
