"""``prepare``: clone the golden image, boot the job's guest, and hand its agent socket to the job.

Every name is recorded in the ledger before the thing it names is made, so a crash at any point
leaves a trail that a re-run of ``prepare``, ``teardown`` or ``reap`` follows to clean up.

A job with a working directory gets it shared into the guest (virtiofs) and mounted at the same
path there; see docs/jobfiles.md for what is checked and why.

An environment with ``context: cloud-init`` runs a stock cloud image: its guest gets a per-job
NoCloud seed (``blahvm.context``), a volume beside its disk that teardown and reap remove with it,
and the job's directory is mounted by the agent over the control port before the bind (the image
boots its own kernel, so no command line can say where).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

import attrs

from blahvm.context import JobContext, make_seed, seed_files
from blahvm.guest import client, control
from blahvm.hypervisor import guests, hotplug, naming, saved
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.domain import (
    BackingFile,
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
from blahvm.jobshare import ShareRefused, check_owned_dir, jail, mount_point, pin, release, share_gids, share_root
from blahvm.ledger import Entry, Ledger, LedgerError, NoCapacity, State
from blahvm.lifecycle import static, templates
from blahvm.lifecycle._bringup import BringUp, hand_over_socket, job_identity, make_run_dir
from blahvm.lifecycle._common import (
    Refusal,
    best_effort_dismantle,
    clone_pool,
    connect,
    job_names,
    queue_slots,
    ready_timeout_of,
)
from blahvm.lifecycle.results import PrepareResult
from blahvm.model import Environment, Job, Outcome, SiteConfig

class _FromEnvironment:
    def __repr__(self) -> str:
        return "FROM_ENVIRONMENT"


FROM_ENVIRONMENT = _FromEnvironment()  # the environment's ready_timeout, else the default for its kind


def prepare(config: SiteConfig, job: Job, *, ready_timeout=FROM_ENVIRONMENT) -> PrepareResult:
    """Make the job's guest and wait until its agent answers: ``ready_timeout`` seconds at most (by
    default the environment's, ``ready_timeout_of``); ``None``: do not wait.

    Idempotent on ``job.job_id``: a live, healthy guest is reused; a half-made one whose maker died
    is cleaned and made again. Never raises for expected failures.
    """
    try:
        environment = _environment(config, job)
        if ready_timeout is FROM_ENVIRONMENT:
            ready_timeout = ready_timeout_of(environment)
        if environment.guests:
            with Ledger(config.host) as ledger, connect(config) as conn:
                return static.prepare_static(config, job, environment, ledger, conn, ready_timeout)
        workdir = _job_workdir(config, job, environment)
        golden = verify_image(environment.name, environment.image, environment.sha256, config.host.state_dir)
        with Ledger(config.host) as ledger, connect(config) as conn:
            return _Preparation(config, job, environment, golden, ledger, conn, ready_timeout, workdir).run()
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
    """The job's directory: where the guest mounts it, and whose ids serve it."""

    guest_path: str
    gids: tuple  # the job's primary gid, then its supplementary groups


def _job_workdir(config: SiteConfig, job: Job, environment: Environment) -> Optional[_Workdir]:
    """The job's directory, checked: absolute, an existing directory owned by the job's user.

    Owned, not merely writable: the share is served with the job's own rights (docs/jobfiles.md).
    Checked here before a slot is taken, and again on the very directory that is pinned.
    """
    if job.workdir is None:
        return None
    path = job.workdir.rstrip("/") or "/"
    problem = _plain_path_problem(path) or _ownership_problem(path, job) or _boot_problem(environment)
    if problem is not None:
        raise Refusal(Outcome.FAIL_JOB, f"job {job.job_id}: working directory {path!r}: {problem}")
    identity = job_identity(job, environment, job_names(config, job.job_id).guest)  # the ids the guest is bound to
    return _Workdir(guest_path=path, gids=share_gids(identity.gid, identity.groups))


def _plain_path_problem(path: str) -> Optional[str]:
    try:
        guest_init.check_workdir(path)
    except ValueError as error:
        return str(error)
    return None


def _ownership_problem(path: str, job: Job) -> Optional[str]:
    try:
        check_owned_dir(path, job.uid)
    except ShareRefused as refused:
        return str(refused)
    return None if job.gid is not None else "cannot be shared: the job has no gid"


def _boot_problem(environment: Environment) -> Optional[str]:
    if environment.context == "cloud-init":  # the agent mounts it, asked over the control port
        return None
    if environment.kernel is None:  # the mount point travels on the kernel command line
        return f"environment {environment.name} boots its own kernel, so its guest cannot be told where to mount it"
    return None


class _ShareNotAttached(Exception):
    """The restored guest did not get the job's directory: the job boots, the template stays."""


class _Preparation(BringUp):
    """A guest cloned from the environment's golden image for this job alone."""

    def __init__(self, config: SiteConfig, job: Job, environment: Environment, golden: ImageInfo, ledger: Ledger,
                 conn: Connection, ready_timeout: Optional[float], workdir: Optional["_Workdir"]) -> None:
        super().__init__(config, job, environment, ledger, conn, ready_timeout)
        self.golden = golden
        self.workdir = workdir

    # -- a new guest --------------------------------------------------------------------------

    def _reserve(self) -> Entry:
        decision = self.job.decision
        try:
            return self.ledger.reserve(
                self.job.job_id, self.job.user, decision.vo, decision.environment, decision.memory, decision.vcpus,
                queue=decision.queue, queue_slots=queue_slots(self.config, decision.queue),
            )
        except NoCapacity as error:
            outcome = Outcome.RETRY_ELSEWHERE if error.ever_fits else Outcome.FAIL_JOB
            raise Refusal(outcome, str(error)) from None

    def _bring_up(self, entry: Entry) -> PrepareResult:
        names = self.names
        entry = self._move(entry, State.CLONING, guest=names.guest, volumes=list(names.volumes(self.environment)),
                           run_dir=names.run_dir)
        template, why = self._template()
        if template is not None:
            try:
                return self._restore(entry, template)
            except _ShareNotAttached as error:  # the state itself was fine: keep it
                why = f"its directory could not be given to the restored guest ({error})"
                entry = self._after_failed_restore(template, drop=False)
            except (templates.TemplateUnusable, saved.SavedStateError, HypervisorError, client.AgentError) as error:
                why = f"restoring its saved state failed ({error})"
                entry = self._after_failed_restore(template)
        self.how = f"booted: {why}"
        disks = self._clone()
        seed = self._seed()
        make_run_dir(self.config.host.run_dir, names.run_dir)
        shares = self._pin_workdir()
        xml = build_domain_xml(self._spec(disks, shares, seed))
        self._move(entry, State.BOOTING)
        started = time.monotonic()
        guests.define_and_start(self.conn, xml)
        self._verify_share()
        hand_over_socket(self.names, self.job, wait=self.ready_timeout is not None, ports=self.job.decision.vcpus)
        result = self._started(started)
        if self.make_template:  # the next job of this environment and shape starts from it
            templates.make_in_background(self.config, self.environment, self._shape())
            self.make_template = False
        return result

    # -- from a saved state -----------------------------------------------------------------------

    def _shape(self) -> templates.Shape:
        return templates.Shape(self.job.decision.memory, self.job.decision.vcpus)

    def _template(self) -> tuple:
        """(the template to restore, None) or (None, why the guest boots instead)."""
        self.make_template = False
        why = templates.why_not(self.environment)
        if why is None and self.conn.uri.startswith("test:"):
            why = "libvirt's test driver saves no guest states"
        if why is None and self.ready_timeout is None:
            why = "asked not to wait, and a restored guest is refreshed and bound before it is handed over"
        if why is not None:
            return None, why
        key = templates.key_of(self.config, self.conn, self.environment, self.golden, self._shape())
        try:
            return templates.find(self.config, key, self._shape()), None
        except templates.TemplateUnusable as unusable:
            full = templates.no_room(self.config.host, self.ledger.usage(), self._shape())
            if full is not None:
                return None, f"{unusable}; none made now: {full}"
            self.make_template = True
            return None, f"{unusable}; making one"

    def _restore(self, entry: Entry, template: templates.Template) -> PrepareResult:
        """A guest restored from ``template``: a new overlay over its frozen disk, the job's own save
        file, then the host's clock and entropy, the job's directory and the job's identity before
        the sockets are handed over."""
        names, job = self.names, self.job
        started = time.monotonic()
        frozen = ImageInfo(template.disk, "qcow2", self.golden.virtual_size)
        path = clone_pool(self.config, self.conn).clone_overlay(frozen, names.disk)
        self.ledger.record_timing(job.job_id, "clone", time.monotonic() - started)
        make_run_dir(self.config.host.run_dir, names.run_dir)
        backing = BackingFile(template.disk, "qcow2", backing=BackingFile(self.golden.path, self.golden.format))
        spec = self._spec((DiskSpec(path, "qcow2", backing=backing),))
        disks = (saved.JobDisk(path, backing),)
        seed = self._seed()  # in place of the template's: its guest ran cloud-init with a job-less one
        if seed is not None:
            disks += (saved.JobDisk(seed),)
        xml = saved.job_definition(template.header.xml, spec.name, spec.uuid, spec.metadata, disks, spec.channels)
        self._move(entry, State.BOOTING)
        started = time.monotonic()
        state = templates.job_state(self.config, template, names.guest, xml)
        try:
            saved.restore(self.conn, state)
        finally:
            templates.forget_job_state(self.config, names.guest)
        self.ledger.record_timing(job.job_id, "restore", time.monotonic() - started)
        started = time.monotonic()
        control.refresh(names.control_socket, self.ready_timeout)  # before anything of the job's runs
        self._share_after_restore()
        self._bind()
        hand_over_socket(names, job, wait=True, ports=job.decision.vcpus)
        self.ledger.record_timing(job.job_id, "ready", time.monotonic() - started)
        self.ledger.transition(job.job_id, State.BOOTING, State.RUNNING)
        self.how = f"restored from saved state {os.path.basename(template.directory)}"
        return self._result(self.ledger.get(job.job_id), f"{self.WHAT} ready")

    def _share_after_restore(self) -> None:
        """The job's directory in a restored guest: pinned as for a boot, its jailed virtiofsd
        hot-plugged (a vhost-user-fs device cannot be saved) and checked, then mounted by the
        agent where stage two of a boot would have, before the bind."""
        if self.workdir is None:
            return
        started = time.monotonic()
        (share,) = self._pin_workdir()
        try:
            hotplug.attach_share(self.conn, self.names.guest, self.environment.flavour, share)
        except HypervisorError as error:
            raise _ShareNotAttached(str(error)) from None
        self._verify_share()
        try:
            control.mount(self.names.control_socket, share.tag, self.workdir.guest_path, self.ready_timeout)
        except client.AgentError as error:
            raise _ShareNotAttached(str(error)) from None
        self.ledger.record_timing(self.job.job_id, "share", time.monotonic() - started)

    def _after_failed_restore(self, template: templates.Template, drop: bool = True) -> Entry:
        """Take away what the restore made (its guest, the overlay, the share) and, with ``drop``,
        the template that failed (made again on next need); back to cloning, for a boot."""
        guests.destroy_and_undefine(self.conn, self.names.guest)
        pool = clone_pool(self.config, self.conn)
        pool.delete_volume(self.names.disk)
        pool.delete_volume(self.names.seed)  # the boot makes its own
        templates.forget_job_state(self.config, self.names.guest)
        if self.workdir is not None:
            release(share_root(self.config.host.run_dir), self.names.guest)
        if drop:
            templates.remove(self.config, template.key)
            self.make_template = True
        entry = self.ledger.get(self.job.job_id)
        if entry.state is State.BOOTING:
            entry = self._move(entry, State.CLONING)
        return entry

    def _take_apart(self, entry: Entry) -> Optional[str]:
        return best_effort_dismantle(self.config, self.conn, entry.guest, entry.volumes, entry.run_dir)

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
            # the golden named as the backing store: libvirt leaves it root's (domain._backing_store)
            backing = BackingFile(self.golden.path, self.golden.format)
            disks = [DiskSpec(pool.clone_overlay(self.golden, self.names.disk), "qcow2", backing=backing)]
        if self.environment.scratch:
            disks.append(DiskSpec(pool.create_scratch(self.names.scratch, int(self.environment.scratch)), "qcow2"))
        self.ledger.record_timing(self.job.job_id, "clone", time.monotonic() - started)
        return tuple(disks)

    def _seed(self) -> Optional[str]:
        """The job's NoCloud seed volume (``context: cloud-init``): its path, or None."""
        if self.environment.context != "cloud-init":
            return None
        started = time.monotonic()
        identity = job_identity(self.job, self.environment, self.names.guest)
        context = JobContext(
            instance_id=f"{self.names.guest}-{os.urandom(4).hex()}",  # a new instance at every prepare
            hostname=naming.guest_hostname(self.names.guest),
            user=identity.user,
            group=identity.group if identity.user is not None else None,
            uid=identity.uid,
            gid=identity.gid,
        )
        image = make_seed(seed_files(context, self.environment.user_data))
        path = clone_pool(self.config, self.conn).create_seed(self.names.seed, image)
        self.ledger.record_timing(self.job.job_id, "seed", time.monotonic() - started)
        return path

    def _bind(self) -> None:
        """A contextualised guest mounts the job's directory before the bind, asked over the
        control port (the same request as after a restore), once its agent answers."""
        if self.environment.context == "cloud-init" and self.workdir is not None:
            try:
                control.mount(self.names.control_socket, guest_init.WORKDIR_TAG, self.workdir.guest_path,
                              self.ready_timeout)
            except client.AgentError as error:
                raise Refusal(Outcome.RETRY_ELSEWHERE, f"{self.WHAT} of job {self.job.job_id} did not mount the "
                              f"job's directory: {error}") from None
        super()._bind()

    def _pin_workdir(self) -> tuple:
        """Pin the job's directory (checked again, on the directory itself) for its guest alone."""
        if self.workdir is None:
            return ()
        root = share_root(self.config.host.run_dir)
        try:
            pin(root, self.names.guest, self.workdir.guest_path, self.job.uid, self.workdir.gids)
        except ShareRefused as refused:
            raise Refusal(Outcome.FAIL_JOB, f"job {self.job.job_id}: working directory "
                          f"{self.workdir.guest_path!r}: {refused}") from None
        return (SharedDir(mount_point(root, self.names.guest), guest_init.WORKDIR_TAG, binary=jail.install(root)),)

    def _verify_share(self) -> None:
        """Once the guest runs: its virtiofsd is jailed and serves the pinned directory."""
        if self.workdir is None or self.conn.uri.startswith("test:"):  # the test driver runs no virtiofsd
            return
        problem = jail.verify_served(share_root(self.config.host.run_dir), self.names.guest)
        if problem is not None:
            raise Refusal(Outcome.FAIL_JOB, f"job {self.job.job_id}: working directory "
                          f"{self.workdir.guest_path!r}: {problem}")

    def _spec(self, disks: tuple, shares: tuple = (), seed: Optional[str] = None) -> GuestSpec:
        env, job, decision = self.environment, self.job, self.job.decision
        metadata = GuestMetadata(
            job_id=job.job_id,
            user=job.user,
            environment=env.name,
            host=socket.gethostname(),
            created=int(time.time()),
            vo=decision.vo,
            name=job.name,
            ledger=self.config.host.state_dir,
        )
        return GuestSpec(
            name=self.names.guest,
            uuid=guest_uuid(self.names.guest),
            flavour=env.flavour,
            memory=decision.memory,
            vcpus=decision.vcpus,
            disks=disks,
            metadata=metadata,
            seed=seed,
            agent_sockets=self.names.sockets(decision.vcpus),  # one per task that may run at once
            control_socket=self.names.control_socket,
            shares=shares,
            kernel=env.kernel,
            initrd=env.initrd,
            cmdline=self._cmdline(),
            bootloader=env.bootloader,
            network=env.network,
            domain_type=resolve_domain_type(self.config.hypervisor.domain_type),
        )

    def _cmdline(self) -> Optional[str]:
        """The environment's kernel command line, plus where stage two mounts the job's directory."""
        if self.workdir is None or self.environment.context == "cloud-init":
            return self.environment.cmdline
        argument = guest_init.workdir_argument(self.workdir.guest_path)
        return " ".join(part for part in (self.environment.cmdline, argument) if part)
