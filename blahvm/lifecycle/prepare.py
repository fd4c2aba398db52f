"""``prepare``: clone the golden image, boot the job's guest, and hand its agent socket to the job.

Every name is recorded in the ledger before the thing it names is made, so a crash at any point
leaves a trail that a re-run of ``prepare``, ``teardown`` or ``reap`` follows to clean up.

A job with a working directory gets it shared into the guest (virtiofs) and mounted at the same
path there; see docs/jobfiles.md for what is checked and why.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time
from typing import Optional

import attrs

from blahvm.guest import client
from blahvm.hypervisor import guests
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.domain import (
    DiskSpec,
    GuestMetadata,
    GuestSpec,
    SharedDir,
    build_domain_xml,
    guest_uuid,
)
from blahvm.hypervisor.errors import HypervisorError
from blahvm.hypervisor.images import ImageInfo, verify_image
from blahvm.hypervisor.kvm import resolve_domain_type
from blahvm.image import guest_init
from blahvm.ledger import Entry, Ledger, LedgerError, NoCapacity, State, owner_alive
from blahvm.lifecycle._common import (
    JobNames,
    Refusal,
    best_effort_dismantle,
    clone_pool,
    connect,
    job_names,
)
from blahvm.lifecycle.results import PrepareResult
from blahvm.model import Environment, Job, Outcome, SiteConfig

DEFAULT_READY_TIMEOUT = 120.0  # seconds from start to the agent's hello (TCG on busy hosts is slow)
SOCKET_APPEAR_TIMEOUT = 10.0
UP_STATES = ("running", "blocked")


def prepare(config: SiteConfig, job: Job, *, ready_timeout: Optional[float] = DEFAULT_READY_TIMEOUT) -> PrepareResult:
    """Make the job's guest and wait until its agent answers (``ready_timeout=None``: do not wait).

    Idempotent on ``job.job_id``: a live, healthy guest is reused; a half-made one whose maker died
    is cleaned and made again. Never raises for expected failures.
    """
    try:
        names = job_names(config, job.job_id)
        environment = _environment(config, job)
        if environment.guests:
            from blahvm.lifecycle import static  # late: static builds on this module's helpers

            with Ledger(config.host) as ledger, connect(config) as conn:
                return static.prepare_static(config, job, environment, ledger, conn, ready_timeout)
        workdir = _job_workdir(job, environment)
        golden = verify_image(environment.name, environment.image, environment.sha256, config.host.state_dir)
        with Ledger(config.host) as ledger, connect(config) as conn:
            return _Preparation(
                config, job, environment, golden, names, ledger, conn, ready_timeout, workdir
            ).run()
    except Refusal as refusal:
        return PrepareResult(refusal.outcome, refusal.message, job.job_id)
    except HypervisorError as error:
        return PrepareResult(error.outcome, str(error), job.job_id)
    except LedgerError as error:
        return PrepareResult(Outcome.RETRY_ELSEWHERE, str(error), job.job_id)
    except OSError as error:
        return PrepareResult(Outcome.RETRY_ELSEWHERE, f"prepare {job.job_id}: {error}", job.job_id)
    except (ValueError, TypeError) as error:  # a job the ledger refuses to record (e.g. an empty user)
        return PrepareResult(Outcome.FAIL_JOB, f"prepare {job.job_id!r}: {error}", job.job_id)


def _environment(config: SiteConfig, job: Job) -> Environment:
    decision = job.decision
    environment = config.environments.get(decision.environment)
    if environment is None:
        raise Refusal(Outcome.FAIL_JOB, f"environment {decision.environment!r} is not in this host's config")
    if decision.memory > environment.memory or decision.vcpus > environment.vcpus:
        raise Refusal(
            Outcome.FAIL_JOB,
            f"job asks for {decision.memory} and {decision.vcpus} vcpus, more than environment "
            f"{environment.name} allows ({environment.memory}, {environment.vcpus} vcpus)",
        )
    return environment


@attrs.frozen
class _Workdir:
    """The job's directory: where the guest mounts it, and the host directory that is shared."""

    guest_path: str
    host_path: str  # the guest path with symlinks resolved, as checked


def _job_workdir(job: Job, environment: Environment) -> Optional[_Workdir]:
    """The job's directory, checked: absolute, an existing directory owned by the job's user.

    Owned, not merely writable: a guest's root can do anything inside the share (docs/jobfiles.md),
    so only a directory that is the user's own is ever exported.
    """
    if job.workdir is None:
        return None
    path = job.workdir.rstrip("/") or "/"
    problem = _plain_path_problem(path) or _ownership_problem(path, job.uid) or _boot_problem(environment)
    if problem is not None:
        raise Refusal(Outcome.FAIL_JOB, f"job {job.job_id}: working directory {path!r}: {problem}")
    return _Workdir(guest_path=path, host_path=os.path.realpath(path))


def _plain_path_problem(path: str) -> Optional[str]:
    try:
        guest_init.check_workdir(path)
    except ValueError as error:
        return str(error)
    return None


def _ownership_problem(path: str, uid: Optional[int]) -> Optional[str]:
    if uid is None:
        return "cannot be checked: the job has no uid"
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    if not stat.S_ISDIR(status.st_mode):
        return "is not a directory"
    if status.st_uid != uid:
        return f"is owned by uid {status.st_uid}, not by the job's uid {uid}"
    return None


def _boot_problem(environment: Environment) -> Optional[str]:
    if environment.kernel is None:  # the mount point travels on the kernel command line
        return f"environment {environment.name} boots its own kernel, so its guest cannot be told where to mount it"
    return None


class _Preparation:
    def __init__(self, config, job, environment, golden, names, ledger, conn, ready_timeout, workdir) -> None:
        self.config: SiteConfig = config
        self.job: Job = job
        self.environment: Environment = environment
        self.golden: ImageInfo = golden
        self.names: JobNames = names
        self.ledger: Ledger = ledger
        self.conn: Connection = conn
        self.ready_timeout: Optional[float] = ready_timeout
        self.workdir: Optional[_Workdir] = workdir

    def run(self) -> PrepareResult:
        existing = self.ledger.get(self.job.job_id)
        if existing is not None and existing.live:
            resumed = self._resume(existing)
            if resumed is not None:
                return resumed
        entry = self._reserve()
        try:
            return self._build(entry)
        except BaseException as error:
            self._undo(error)
            raise

    # -- an earlier prepare of the same job ---------------------------------------------------

    def _resume(self, entry: Entry) -> Optional[PrepareResult]:
        """A result if the existing entry can stand; None once a broken one is cleaned away."""
        if entry.state is State.TEARING_DOWN:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {self.job.job_id} is being torn down on this host")
        up = entry.guest is not None and guests.domain_state(self.conn, entry.guest) in UP_STATES
        if up and entry.state is State.RUNNING:
            return self._result(entry, "reused the running guest", reused=True)
        if up and entry.state is State.BOOTING:
            if self.ready_timeout is None:
                return self._result(entry, "reused the booting guest", reused=True)
            return self._await_agent(entry, reused=True)
        if entry.state is not State.RUNNING and owner_alive(entry) and entry.pid != os.getpid():
            raise Refusal(
                Outcome.RETRY_ELSEWHERE, f"job {self.job.job_id} is being prepared by process {entry.pid}"
            )
        self._clean_stale(entry)
        return None

    def _clean_stale(self, entry: Entry) -> None:
        claimed = self.ledger.transition(
            entry.job_id, entry.state, State.TEARING_DOWN, expected_version=entry.version, pid=os.getpid()
        )
        if claimed is None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {entry.job_id} changed while prepare looked at it")
        problem = best_effort_dismantle(self.config, self.conn, claimed.guest, claimed.volumes, claimed.run_dir)
        if problem is not None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"cannot clean the earlier guest of {entry.job_id}: {problem}")
        self.ledger.close(entry.job_id, Outcome.RETRY_ELSEWHERE, "half made; redone", expected_version=claimed.version)

    # -- a new guest --------------------------------------------------------------------------

    def _reserve(self) -> Entry:
        decision = self.job.decision
        try:
            return self.ledger.reserve(
                self.job.job_id, self.job.user, decision.vo, decision.environment, decision.memory, decision.vcpus
            )
        except NoCapacity as error:
            outcome = Outcome.RETRY_ELSEWHERE if error.ever_fits else Outcome.FAIL_JOB
            raise Refusal(outcome, str(error)) from None

    def _build(self, entry: Entry) -> PrepareResult:
        names = self.names
        entry = self._move(entry, State.CLONING, guest=names.guest, volumes=list(names.volumes(self.environment)),
                           run_dir=names.run_dir)
        disks = self._clone()
        make_run_dir(self.config.host.run_dir, names.run_dir)
        xml = build_domain_xml(self._spec(disks))
        entry = self._move(entry, State.BOOTING)
        started = time.monotonic()
        guests.define_and_start(self.conn, xml)
        self._hand_over_socket()
        self.ledger.record_timing(self.job.job_id, "boot", time.monotonic() - started)
        if self.ready_timeout is None:
            # handed over: whoever asked not to wait owns readiness; a "booting" entry is always a prepare at work
            self.ledger.transition(self.job.job_id, State.BOOTING, State.RUNNING)
            return self._result(self.ledger.get(self.job.job_id), "guest started")
        return self._await_agent(entry, reused=False)

    def _move(self, entry: Entry, state: State, **fields) -> Entry:
        """Compare-and-set on the entry as this prepare last wrote it (timings bump the version too)."""
        current = self.ledger.get(entry.job_id)
        same_run = current is not None and current.id == entry.id and current.pid == os.getpid()
        moved = None
        if same_run:
            moved = self.ledger.transition(
                entry.job_id, entry.state, state, expected_version=current.version, **fields
            )
        if moved is None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {entry.job_id} changed in the ledger while being prepared")
        return moved

    def _clone(self) -> tuple:
        started = time.monotonic()
        pool = clone_pool(self.config, self.conn)
        if self.environment.clone == "copy":
            disks = [DiskSpec(pool.clone_copy(self.golden, self.names.disk), self.golden.format)]
        else:
            disks = [DiskSpec(pool.clone_overlay(self.golden, self.names.disk), "qcow2")]
        if self.environment.scratch:
            disks.append(DiskSpec(pool.create_scratch(self.names.scratch, int(self.environment.scratch)), "qcow2"))
        self.ledger.record_timing(self.job.job_id, "clone", time.monotonic() - started)
        return tuple(disks)

    def _spec(self, disks: tuple) -> GuestSpec:
        env, job, decision = self.environment, self.job, self.job.decision
        metadata = GuestMetadata(
            job_id=job.job_id,
            user=job.user,
            environment=env.name,
            host=socket.gethostname(),
            created=int(time.time()),
            vo=decision.vo,
            name=job.name,
        )
        return GuestSpec(
            name=self.names.guest,
            uuid=guest_uuid(self.names.guest),
            flavour=env.flavour,
            memory=decision.memory,
            vcpus=decision.vcpus,
            disks=disks,
            metadata=metadata,
            agent_sockets=(self.names.socket,),
            shares=self._shares(),
            kernel=env.kernel,
            initrd=env.initrd,
            cmdline=self._cmdline(),
            bootloader=env.bootloader,
            network=env.network,
            domain_type=resolve_domain_type(self.config.hypervisor.domain_type),
        )

    def _shares(self) -> tuple:
        if self.workdir is None:
            return ()
        return (SharedDir(self.workdir.host_path, guest_init.WORKDIR_TAG),)

    def _cmdline(self) -> Optional[str]:
        """The environment's kernel command line, plus where stage two mounts the job's directory."""
        if self.workdir is None:
            return self.environment.cmdline
        argument = guest_init.workdir_argument(self.workdir.guest_path)
        return " ".join(part for part in (self.environment.cmdline, argument) if part)

    def _hand_over_socket(self) -> None:
        hand_over_socket(self.names, self.job, wait=self.ready_timeout is not None)

    def _await_agent(self, entry: Entry, reused: bool) -> PrepareResult:
        started = time.monotonic()
        try:
            client.wait_ready(self.names.socket, self.ready_timeout)
        except client.AgentError as error:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"guest {self.names.guest} did not become ready: {error}") from None
        self.ledger.record_timing(self.job.job_id, "ready", time.monotonic() - started)
        self.ledger.transition(self.job.job_id, State.BOOTING, State.RUNNING)
        current = self.ledger.get(self.job.job_id)
        return self._result(current, "guest ready", reused=reused)

    def _undo(self, error: BaseException) -> None:
        """Take apart whatever this prepare made and free the slot; the trail is in the ledger."""
        entry = self.ledger.get(self.job.job_id)
        if entry is None or not entry.live or entry.pid != os.getpid():
            return
        entry = self.ledger.transition(entry.job_id, entry.state, State.TEARING_DOWN, expected_version=entry.version)
        if entry is None:
            return
        problem = best_effort_dismantle(self.config, self.conn, entry.guest, entry.volumes, entry.run_dir)
        if problem is None:  # else the entry stays live for teardown or reap to finish
            outcome = getattr(error, "outcome", Outcome.RETRY_ELSEWHERE)
            self.ledger.close(entry.job_id, outcome, str(error) or type(error).__name__, expected_version=entry.version)

    def _result(self, entry: Entry, message: str, reused: bool = False) -> PrepareResult:
        return PrepareResult(
            Outcome.OK,
            f"job {self.job.job_id}: {message} ({entry.guest})",
            self.job.job_id,
            guest=entry.guest,
            run_dir=entry.run_dir,
            socket=self.names.socket,
            reused=reused,
            timings=entry.timings,
        )


def hand_over_socket(names: JobNames, job: Job, wait: bool) -> None:
    """Give the socket, then its directory, to the job's user (drivers without channels make none)."""
    if wait:
        _wait_for_path(names.socket, SOCKET_APPEAR_TIMEOUT)
    uid = -1 if job.uid is None else job.uid
    gid = -1 if job.gid is None else job.gid
    if os.path.lexists(names.socket):
        # The directory is still root's alone, so nobody can have swapped the socket for a link.
        os.chown(names.socket, uid, gid, follow_symlinks=False)
        os.chmod(names.socket, 0o600)
    os.chown(names.run_dir, uid, gid)


def make_run_dir(root: str, run_dir: str) -> None:
    """The job's run dir, root's alone (0700) until the socket in it is handed over."""
    if not os.path.isdir(root):
        os.makedirs(root, exist_ok=True)
        os.chmod(root, 0o755)  # whatever the umask (a PBS mom runs prologues with 077): users enter their own
    if os.path.lexists(run_dir):  # left by an earlier run of this job, which the live entry now owns
        shutil.rmtree(run_dir)
    os.mkdir(run_dir, 0o700)
    os.chmod(run_dir, 0o700)  # whatever the umask


def _wait_for_path(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
