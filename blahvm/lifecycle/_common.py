"""Pieces every lifecycle step shares: the job's names and paths, and taking its things apart."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import attrs

from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import Connection, open_connection
from blahvm.hypervisor.errors import HypervisorError
from blahvm.hypervisor.storage import ClonePool
from blahvm.jobshare import release, share_root
from blahvm.lifecycle import _rundir
from blahvm.model import Environment, Outcome, SiteConfig

# Seconds from start to the agent's answer where the environment sets no ready_timeout
# (docs/configuration.md). TCG on busy hosts is slow; a stock image boots systemd and runs
# cloud-init (the site's packages and commands too) before its agent starts.
DEFAULT_READY_TIMEOUT = 120.0
CLOUD_INIT_READY_TIMEOUT = 600.0

AGENT_SOCKET = "agent.{}.sock"  # the names guest.client.acquire_port looks for
MAX_AGENT_PORTS = 16  # one per vcpu, so each task of a parallel job has its own; a virtio-serial bus has 31


class Refusal(Exception):
    """An expected reason to stop: carries the outcome and the one-line message for the result."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


@attrs.frozen
class JobNames:
    """Every name and path of a job's guest, derived from its id (never the id itself)."""

    guest: str
    disk: str
    scratch: str
    seed: str  # the NoCloud seed volume of a ``context: cloud-init`` environment
    run_dir: str

    @property
    def socket(self) -> str:
        """The first agent port's socket: the one readiness is asked on."""
        return os.path.join(self.run_dir, AGENT_SOCKET.format(0))

    @property
    def control_socket(self) -> str:
        """The control port's socket: beside the run dir, root's alone, never handed over."""
        return control_socket_of(self.run_dir)

    def sockets(self, count: int) -> Tuple[str, ...]:
        """The sockets of ``count`` agent ports (at least one, at most MAX_AGENT_PORTS)."""
        count = max(1, min(count, MAX_AGENT_PORTS))
        return tuple(os.path.join(self.run_dir, AGENT_SOCKET.format(i)) for i in range(count))

    def volumes(self, environment: Environment) -> Tuple[str, ...]:
        """Every volume the job's guest gets, recorded in the ledger before any is made."""
        volumes = (self.disk, self.scratch) if environment.scratch else (self.disk,)
        return volumes + (self.seed,) if environment.context == "cloud-init" else volumes


def ready_timeout_of(environment: Environment) -> float:
    """How long to wait for the agent of ``environment``'s guests when no caller says."""
    if environment.ready_timeout is not None:
        return float(environment.ready_timeout)
    return CLOUD_INIT_READY_TIMEOUT if environment.context == "cloud-init" else DEFAULT_READY_TIMEOUT


def control_socket_of(run_dir: str) -> str:
    return run_dir + ".ctl"


def job_state_path(config: SiteConfig, guest: str) -> str:
    """The job's own save file while its guest is restored from a template (lifecycle.templates)."""
    return os.path.join(config.host.state_dir, "templates", ".restoring", naming.check_safe_name(guest) + ".save")


def job_names(config: SiteConfig, job_id: str) -> JobNames:
    """The names this installation gives the job's guest: the job id and the state dir in its hash."""
    return _names(config, naming.guest_name(job_id, config.host.state_dir))


def legacy_job_names(config: SiteConfig, job_id: str) -> JobNames:
    """The names a guest of the job got before names carried the installation (an upgrade's live jobs)."""
    return _names(config, naming.legacy_guest_name(job_id))


def all_job_names(config: SiteConfig, job_id: str) -> Tuple[JobNames, ...]:
    """Every naming this installation has used for the job's guest: the current one first."""
    return (job_names(config, job_id), legacy_job_names(config, job_id))


def job_names_in_use(config: SiteConfig, job_id: str) -> JobNames:
    """The job's names as its run dir shows them: the legacy ones only where a guest prepared before the
    upgrade still has its run dir and the current one has none (``launch`` runs without the ledger)."""
    current, legacy = all_job_names(config, job_id)
    if not os.path.isdir(current.run_dir) and os.path.isdir(legacy.run_dir):
        return legacy
    return current


def _names(config: SiteConfig, guest: str) -> JobNames:
    return JobNames(
        guest=guest,
        disk=naming.disk_volume_name(guest),
        scratch=naming.scratch_volume_name(guest),
        seed=naming.seed_volume_name(guest),
        run_dir=os.path.join(config.host.run_dir, guest),
    )


def queue_slots(config: SiteConfig, queue: str) -> Optional[int]:
    """The ``slots_per_host`` of ``queue`` in this host's config; None when it sets none (or the queue is not there)."""
    found = config.queues.get(queue)
    return None if found is None else found.slots_per_host


def connect(config: SiteConfig) -> Connection:
    return open_connection(config.hypervisor.uri, timeout=float(config.hypervisor.timeout))


def clone_pool(config: SiteConfig, conn: Connection) -> ClonePool:
    return ClonePool.ensure(conn, config.hypervisor.pool, config.hypervisor.pool_path)


def is_run_dir(config: SiteConfig, path: Optional[str]) -> bool:
    """Only directories blahvm names under ``host.run_dir`` are ever removed."""
    if not path:
        return False
    parent, name = os.path.split(os.path.normpath(path))
    return parent == os.path.normpath(config.host.run_dir) and name.startswith(naming.PREFIX)


@attrs.frozen
class Dismantled:
    guest_removed: bool
    volumes_removed: Tuple[str, ...]


def dismantle(
    config: SiteConfig,
    conn: Connection,
    guest: Optional[str],
    volumes: Tuple[str, ...],
    run_dir: Optional[str],
) -> Dismantled:
    """Destroy and undefine the guest, delete its volumes, remove its run dir; gone is fine."""
    removed = bool(guest) and guests.destroy_and_undefine(conn, guest)
    if guest:  # its virtiofsd is gone with it: unmount the job's pinned directory
        release(share_root(config.host.run_dir), guest)
        with contextlib.suppress(FileNotFoundError):  # a prepare killed while restoring left it
            os.unlink(job_state_path(config, guest))
    deleted = []
    if volumes:
        pool = clone_pool(config, conn)
        deleted = [volume for volume in volumes if pool.delete_volume(volume)]
    if is_run_dir(config, run_dir):
        # by descriptors from a root only root can write: never through a symlink
        _rundir.remove(config.host.run_dir, run_dir)
        _rundir.remove(config.host.run_dir, control_socket_of(run_dir))
    return Dismantled(removed, tuple(deleted))


def best_effort_dismantle(config, conn, guest, volumes, run_dir) -> Optional[str]:
    """``dismantle`` for cleanup after a failure: returns the problem instead of raising."""
    try:
        dismantle(config, conn, guest, volumes, run_dir)
    except (HypervisorError, OSError) as error:
        return str(error)
    return None
