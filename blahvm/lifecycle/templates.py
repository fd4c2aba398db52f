"""Templates: saved post-boot states that a job's guest starts from instead of booting.

One template per environment and shape (memory, vcpus), kept root's under
``<state_dir>/templates/t-<key>/``: ``disk.qcow2`` (the template guest's overlay on the golden,
frozen: root's, 0444), ``state.save`` (libvirt's save file, root's, 0600) and ``template.json``
(written last: what the key was made of, the sizes). The key hashes everything the state depends
on: the golden's checksum, the kernel, initrd and command line, the shape, the domain type, the
agent and the libvirt and QEMU versions. Anything else changed means another key, so a stale
template is never found; the old one of the same environment and shape is removed once its
successor exists.

A template is made by a boot that runs no job (its agent is never bound, so it runs nothing), saved
as soon as its agent answers, and never resumed: each job gets a save file of its own
(``hypervisor.saved.write_job_state``, under ``.restoring/``, deleted once restored), a new overlay
over the frozen disk, then, from the host, the clock and fresh entropy, the job's directory (its
memory is a shared memfd, so the share can be hot-plugged and mounted), and only then its identity.

Making one works in ``.making-t-<key>-<pid>-<start>/`` (the maker's pid and its start time, so a
recycled pid is not taken for it) and renames it into place. Its guest is transient and bound to the
maker's libvirt connection (``guests.start_bound_to_connection``): libvirt destroys it when the maker
ends, however it ends, SIGKILL included. A maker stops and cleans up on SIGTERM, SIGINT or SIGHUP,
and as soon as its scratch directory vanishes (its site was removed under it); it never makes its
state dir or pool again. What a killed maker leaves (the scratch dir, a volume and run dir named
``blahvm-template-<key>``) ``reap`` removes once the maker is dead (``leftovers``). The scratch dir
is made before those and removed after them, so a reap that looks for live makers after listing
them never takes a live maker's things for orphans. A maker started in the background is also
marked ``.maker-<pid>-<start>`` from before the prepare that started it returns until it ends:
``wait_for_makers`` waits for both kinds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from typing import List, Optional

import attrs

from blahvm.context import JobContext, make_seed, seed_files
from blahvm.guest import agent as agent_module
from blahvm.guest import client
from blahvm.hypervisor import guests, naming, saved
from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.domain import BackingFile, DiskSpec, GuestMetadata, GuestSpec, build_domain_xml, guest_uuid
from blahvm.hypervisor.errors import HypervisorError
from blahvm.hypervisor.images import ImageInfo
from blahvm.hypervisor.storage import ClonePool
from blahvm.hypervisor.kvm import resolve_domain_type
from blahvm.lifecycle import _rundir
from blahvm.lifecycle._common import (
    AGENT_SOCKET,
    MAX_AGENT_PORTS,
    clone_pool,
    control_socket_of,
    job_state_path,
    ready_timeout_of,
)
from blahvm.ledger import NoCapacity, Usage
from blahvm.ledger.capacity import check_fits
from blahvm.model import Environment, HostConfig, SiteConfig
from blahvm.quantities import Size
from blahvm.trust import directory_problem

FORMAT = 2  # of a template directory; a new format is a new key (2: shared memfd memory)
TEMPLATE_PREFIX = "blahvm-template-"  # its guest, volume and run dir while it is made
MAKING = ".making-"
MAKER = ".maker-"  # a background maker's mark, from its start to its end (``.maker-<pid>-<start>``)
RESTORING = ".restoring"


class TemplateUnusable(Exception):
    """Why a job's guest boots instead: one line for the log."""


@attrs.frozen
class Shape:
    memory: Size
    vcpus: int


def no_room(host: HostConfig, usage: Usage, shape: Shape) -> Optional[str]:
    """Why the host has no room now for a template guest beside its jobs' (``usage``, this job's
    included), or None (pure). A template guest holds no ledger slot while it is made, so one is made
    only where a job's guest would still fit: a full host makes it for a later job instead."""
    try:
        check_fits(host, usage, shape.memory, shape.vcpus)
    except NoCapacity as full:
        return f"no room for its guest beside the jobs' ({full})"
    return None


@attrs.frozen
class Template:
    """A complete template on disk, checked."""

    directory: str
    key: str
    environment: str
    shape: Shape
    state_size: int
    disk_size: int
    header: saved.SaveHeader

    @property
    def state(self) -> str:
        return os.path.join(self.directory, "state.save")

    @property
    def disk(self) -> str:
        return os.path.join(self.directory, "disk.qcow2")


# -- where, and under which key -------------------------------------------------------------------


def root(config: SiteConfig) -> str:
    return os.path.join(config.host.state_dir, "templates")


def why_not(environment: Environment) -> Optional[str]:
    """Why this environment's jobs boot whatever templates exist, or None if they may start from one."""
    if environment.start == "boot":
        return "the environment says start: boot"
    if environment.flavour != "kvm":
        return f"the {environment.flavour} flavour starts no saved states here"
    if environment.clone != "overlay":
        return "its clones are full copies"
    if environment.network is not None:
        return "it has a network: restored guests would share the template's MAC address"
    if environment.scratch:
        return "it has a scratch disk"
    return None


def _file_identity(path: Optional[str]) -> Optional[list]:
    if path is None:
        return None
    status = os.stat(path)
    # not ctime: libvirt chowns a kernel to QEMU's user and back at every guest's start
    return [path, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns]


_AGENT_SHA: List[str] = []


def _agent_sha() -> str:
    if not _AGENT_SHA:
        with open(agent_module.__file__, "rb") as source:
            _AGENT_SHA.append(hashlib.sha256(source.read()).hexdigest())
    return _AGENT_SHA[0]


def key_of(config: SiteConfig, conn: Connection, environment: Environment, golden: ImageInfo, shape: Shape) -> str:
    """What a template's state depends on, hashed (16 hex digits)."""
    facts = {
        "format": FORMAT,
        "golden": [golden.path, golden.format, environment.sha256],
        "kernel": _file_identity(environment.kernel),
        "initrd": _file_identity(environment.initrd),
        "cmdline": environment.cmdline,
        "shape": [int(shape.memory), shape.vcpus],
        "domain_type": resolve_domain_type(config.hypervisor.domain_type),
        "agent": _agent_sha(),
        "libvirt": conn.call("libvirt version", conn.raw.getLibVersion),
        "hypervisor": conn.call("hypervisor version", conn.raw.getVersion),
    }
    if environment.context != "none":  # what cloud-init made of the site's additions is in the state
        facts["context"] = [environment.context, environment.user_data]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _directory(config: SiteConfig, key: str) -> str:
    return os.path.join(root(config), "t-" + key)


def _ensure_root(config: SiteConfig, make_state_dir: bool = True) -> str:
    """The templates directory, root's, 0711 (QEMU's user reaches the frozen disks, lists nothing),
    in a state dir only root can change."""
    path = root(config)
    if make_state_dir:
        os.makedirs(config.host.state_dir, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o711)
    problem = directory_problem(path)
    if problem is not None:
        raise TemplateUnusable(f"templates directory {path} is refused: {problem}")
    os.chmod(path, 0o711)
    return path


# -- finding one --------------------------------------------------------------------------------


def find(config: SiteConfig, key: str, shape: Shape) -> Template:
    """The complete template of ``key``; TemplateUnusable (one line) if it is missing or damaged."""
    directory = _directory(config, key)
    try:
        with open(os.path.join(directory, "template.json"), encoding="utf-8") as file:
            recorded = json.load(file)
        problem = directory_problem(directory)
    except FileNotFoundError:
        raise TemplateUnusable("no saved state yet for this environment and shape") from None
    except (OSError, ValueError) as error:
        raise TemplateUnusable(f"its saved state's record is unreadable: {error}") from None
    if problem is not None:
        raise TemplateUnusable(f"its saved state is refused: {problem}")
    if recorded.get("key") != key:
        raise TemplateUnusable("its saved state's record does not match its key")
    template = Template(directory, key, recorded.get("environment", ""), shape, recorded.get("state_size", -1),
                        recorded.get("disk_size", -1), saved.SaveHeader(0, False, 0, "", None, 0))
    for path, size in ((template.state, template.state_size), (template.disk, template.disk_size)):
        try:
            status = os.stat(path, follow_symlinks=False)
        except OSError:
            raise TemplateUnusable(f"its saved state lacks {os.path.basename(path)}") from None
        if status.st_uid != 0 or status.st_mode & 0o022 or status.st_size != size:
            raise TemplateUnusable(f"its {os.path.basename(path)} changed since it was saved")
    try:
        header = saved.read_header(template.state)
    except saved.SavedStateError as error:
        raise TemplateUnusable(str(error)) from None
    return attrs.evolve(template, header=header)


def restoring_path(config: SiteConfig, guest: str) -> str:
    """Where a job's own save file lives while its guest is restored (root's alone)."""
    return job_state_path(config, guest)


def job_state(config: SiteConfig, template: Template, guest: str, xml: str) -> str:
    """The job's own save file: the template's state under the job's domain XML."""
    directory = os.path.join(_ensure_root(config), RESTORING)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    path = restoring_path(config, guest)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier attempt of the same job's
    try:
        saved.write_job_state(template.state, template.header, xml, path, template.state_size)
    except OSError as error:
        raise TemplateUnusable(f"cannot write the job's saved state: {error}") from None
    except saved.SavedStateError as error:
        raise TemplateUnusable(str(error)) from None
    return path


def forget_job_state(config: SiteConfig, guest: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(restoring_path(config, guest))


# -- making one ---------------------------------------------------------------------------------


@attrs.frozen
class Made:
    template: Template
    seconds: float
    made: bool  # False: it was there already


def guest_name(key: str) -> str:
    return TEMPLATE_PREFIX + key


def key_of_guest(name: str) -> Optional[str]:
    """The key of the template whose maker's guest is ``name``, or None for any other guest (a job's
    is ``blahvm-<id>-<8 hex>``: never the prefix and 16 hex digits alone)."""
    key = name[len(TEMPLATE_PREFIX):] if name.startswith(TEMPLATE_PREFIX) else ""
    return key if len(key) == 16 and all(c in "0123456789abcdef" for c in key) else None


def make(config: SiteConfig, conn: Connection, environment: Environment, golden: ImageInfo, shape: Shape,
         on_guest=None, background: bool = False) -> Optional[Made]:
    """Make the template of ``environment`` and ``shape`` unless it exists; None if another process
    is making it now. ``on_guest(name)`` is called once its guest is defined (tests kill us there).
    ``background``: a maker no one waits for, which gives up if its site's state dir is gone."""
    started = time.monotonic()
    if background and not os.path.isdir(config.host.state_dir):
        raise TemplateUnusable(f"state dir {config.host.state_dir} is gone: its site was removed")
    key = key_of(config, conn, environment, golden, shape)
    with contextlib.suppress(TemplateUnusable):
        return Made(find(config, key, shape), 0.0, False)
    try:
        top = _ensure_root(config, make_state_dir=not background)
    except FileNotFoundError:
        raise TemplateUnusable(f"state dir {config.host.state_dir} is gone: its site was removed") from None
    lock = os.open(os.path.join(top, f".t-{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        with contextlib.suppress(TemplateUnusable):
            return Made(find(config, key, shape), 0.0, False)
        _remove_leftovers_of(config, conn, key)
        scratch = os.path.join(top, f"{MAKING}t-{key}-{os.getpid()}-{_start_time(os.getpid())}")
        os.mkdir(scratch, 0o711)
        try:
            try:
                _make_in(config, conn, environment, golden, shape, key, scratch, on_guest, background)
            finally:  # while the scratch dir is there, reap knows the guest, volume and run dir are ours
                _take_apart_guest(config, conn, key)
            final = _directory(config, key)
            shutil.rmtree(final, ignore_errors=True)  # a damaged one of the same key
            os.rename(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _remove_predecessors(config, environment.name, shape, key)
        return Made(find(config, key, shape), time.monotonic() - started, True)
    finally:
        os.close(lock)


def _make_in(config, conn, environment, golden, shape, key, scratch, on_guest, background) -> None:
    name = guest_name(key)
    run_dir = os.path.join(config.host.run_dir, name)
    pool = ClonePool.find(conn, config.hypervisor.pool) if background else clone_pool(config, conn)
    if pool is None:  # the job that asked for it has its pool: gone means its site was removed
        raise TemplateUnusable(f"pool {config.hypervisor.pool} is gone: its site was removed")
    volume = name + ".qcow2"
    disk = pool.clone_overlay(golden, volume)
    seed = None
    if environment.context == "cloud-init":  # no job's: the agent and the site's additions; the bind names it
        context = JobContext(instance_id=name, hostname=naming.guest_hostname(name))
        seed = pool.create_seed(naming.seed_volume_name(name), make_seed(seed_files(context, environment.user_data)))
    _rundir.make(config.host.run_dir, run_dir)
    ports = max(1, min(shape.vcpus, MAX_AGENT_PORTS))  # the job's guest has the same channels
    spec = GuestSpec(
        name=name,
        uuid=guest_uuid(name),
        flavour=environment.flavour,
        memory=shape.memory,
        vcpus=shape.vcpus,
        disks=(DiskSpec(disk, "qcow2", backing=BackingFile(golden.path, golden.format)),),
        seed=seed,  # each job restored from the state gets its own in its place
        metadata=GuestMetadata(job_id=f"template {environment.name}", user="root", environment=environment.name,
                               host=socket.gethostname(), created=int(time.time()), ledger=config.host.state_dir),
        agent_sockets=tuple(os.path.join(run_dir, AGENT_SOCKET.format(i)) for i in range(ports)),
        control_socket=control_socket_of(run_dir),
        kernel=environment.kernel,
        initrd=environment.initrd,
        cmdline=environment.cmdline,
        bootloader=environment.bootloader,
        domain_type=resolve_domain_type(config.hypervisor.domain_type),
        genid=True,
        shared_memory=True,  # so a job's share can be hot-plugged after the restore (virtiofs)
    )
    guests.start_bound_to_connection(conn, build_domain_xml(spec))  # gone when this process is
    if on_guest is not None:
        on_guest(name)
    # its agent answers: booted. Never bound, so it never ran anything.
    _wait_ready(spec.control_socket, scratch, ready_timeout_of(environment))
    state = os.path.join(scratch, "state.save")
    saved.save(conn, name, state)
    header = saved.read_header(state)
    frozen = os.path.join(scratch, "disk.qcow2")
    shutil.copyfile(disk, frozen)  # the overlay as the template guest left it: frozen, root's, read-only
    os.chown(frozen, 0, 0)
    os.chmod(frozen, 0o444)
    os.chown(state, 0, 0)
    os.chmod(state, 0o600)
    record = {
        "key": key,
        "environment": environment.name,
        "memory": int(shape.memory),
        "vcpus": shape.vcpus,
        "golden": golden.path,
        "state_size": os.path.getsize(state),
        "disk_size": os.path.getsize(frozen),
        "stream_offset": header.stream_offset,
        "made": int(time.time()),
    }
    with open(os.path.join(scratch, "template.json"), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())


def _wait_ready(control_socket: str, scratch: str, timeout: float) -> None:
    """Until the template guest's agent answers, in short waits: a maker whose scratch dir vanished
    (its site was removed) stops at once instead of waiting out the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if not os.path.isdir(scratch):
            raise TemplateUnusable(f"{scratch} vanished while the template guest booted: its site was removed")
        try:
            client.wait_ready(control_socket, min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except client.AgentError as error:
            if time.monotonic() >= deadline:
                raise TemplateUnusable(f"the template guest did not become ready: {error}") from None


def _take_apart_guest(config: SiteConfig, conn: Connection, key: str) -> None:
    """The template guest, its volumes (disk and seed) and run dir: gone is fine. Nothing is made to
    do it (a pool removed with its site stays removed)."""
    name = guest_name(key)
    with contextlib.suppress(HypervisorError):
        guests.destroy_and_undefine(conn, name)
    with contextlib.suppress(HypervisorError):
        pool = ClonePool.find(conn, config.hypervisor.pool)
        if pool is not None:
            pool.delete_volume(name + ".qcow2")
            pool.delete_volume(naming.seed_volume_name(name))
    run_dir = os.path.join(config.host.run_dir, name)
    with contextlib.suppress(OSError):
        if os.path.isdir(run_dir):
            _rundir.remove(config.host.run_dir, run_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_socket_of(run_dir))


def _remove_leftovers_of(config: SiteConfig, conn: Connection, key: str) -> None:
    _take_apart_guest(config, conn, key)
    for making in _making_dirs(config):
        if making.key == key and not making.alive:
            shutil.rmtree(making.scratch, ignore_errors=True)


def _remove_predecessors(config: SiteConfig, environment: str, shape: Shape, key: str) -> None:
    """Older templates of the same environment and shape: a guest already restored from one keeps
    its open files; a job about to restore from it falls back to a boot."""
    for entry in listing(config):
        if entry["key"] != key and entry.get("environment") == environment and \
                (entry.get("memory"), entry.get("vcpus")) == (int(shape.memory), shape.vcpus):
            shutil.rmtree(entry["directory"], ignore_errors=True)


def remove(config: SiteConfig, key: str) -> None:
    """Drop the template of ``key`` (damaged: it is made again on next need)."""
    shutil.rmtree(_directory(config, key), ignore_errors=True)


def listing(config: SiteConfig) -> List[dict]:
    """The records of every complete template, with their directory."""
    found = []
    try:
        names = sorted(os.listdir(root(config)))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("t-"):
            continue
        directory = os.path.join(root(config), name)
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(directory, "template.json"), encoding="utf-8") as file:
                record = json.load(file)
            found.append({**record, "directory": directory})
    return found


# -- after a crash ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> Optional[List[bytes]]:
    """/proc/<pid>/stat after the command name (state is [0], start time [19]), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else 0


def _alive(pid: int, start: Optional[int] = None) -> bool:
    """Whether ``pid`` still runs (a zombie, killed but not yet waited for, does not) and, given
    ``start``, is the process that started then, not another that got its pid since."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return False
    return start is None or int(fields[19]) == start


@attrs.frozen
class _Making:
    scratch: str
    key: str
    pid: int
    start: Optional[int]  # None: named before makers recorded it

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.start)


def _named(config: SiteConfig, prefix: str) -> List[str]:
    """What the site's templates directory holds under names starting ``prefix`` (the part after it)."""
    try:
        names = os.listdir(root(config))
    except FileNotFoundError:
        return []
    return [name[len(prefix):] for name in names if name.startswith(prefix)]


def _making_dirs(config: SiteConfig) -> List[_Making]:
    found = []
    for rest in _named(config, MAKING + "t-"):
        parts = rest.split("-")  # KEY-PID-START (START missing in older names)
        with contextlib.suppress(ValueError, IndexError):
            start = int(parts[2]) if len(parts) > 2 else None
            found.append(_Making(os.path.join(root(config), MAKING + "t-" + rest), parts[0], int(parts[1]), start))
    return found


def being_made(config: SiteConfig) -> frozenset:
    """Names of the template guests a live maker is working on: reap leaves them alone."""
    return frozenset(guest_name(making.key) for making in _making_dirs(config) if making.alive)


@attrs.frozen
class _Maker:
    path: str
    pid: int
    start: int

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.start)


def _maker_path(config: SiteConfig, pid: int, start: int) -> str:
    return os.path.join(root(config), f"{MAKER}{pid}-{start}")


def _makers(config: SiteConfig) -> List[_Maker]:
    found = []
    for rest in _named(config, MAKER):
        with contextlib.suppress(ValueError):
            pid, start = rest.split("-")
            found.append(_Maker(os.path.join(root(config), MAKER + rest), int(pid), int(start)))
    return found


def at_work(config: SiteConfig) -> bool:
    """Whether a template maker of this site lives: one started in the background (marked before
    the prepare that started it returns, unmarked once it has taken its guest apart) or one making
    in its scratch dir (``blahvm image warm``)."""
    return any(maker.alive for maker in _makers(config)) or any(making.alive for making in _making_dirs(config))


def wait_for_makers(config: SiteConfig, timeout: float) -> bool:
    """Until no template maker of this site lives (what it made is then in place, or it gave up and
    took its guest apart); False if one still works after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while at_work(config):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def leftovers(config: SiteConfig, live_guests: set) -> List[str]:
    """What a killed maker, or a prepare killed while restoring, left under the templates
    directory: scratch dirs of dead makers, job save files of guests no live entry owns."""
    found = [making.scratch for making in _making_dirs(config) if not making.alive]
    found += [maker.path for maker in _makers(config) if not maker.alive]
    try:
        restoring = os.listdir(os.path.join(root(config), RESTORING))
    except FileNotFoundError:
        restoring = []
    found += [os.path.join(root(config), RESTORING, name) for name in restoring
              if name.endswith(".save") and name[: -len(".save")] not in live_guests]
    return sorted(found)


def remove_leftovers(paths: List[str]) -> None:
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# -- made in the background, after a job booted for want of one -----------------------------------


# The maker's interpreter is the one of the process that starts it, with the same import path: a
# hook runs ``python -IS`` with blahvm's directories written into it, on an interpreter that may have
# blahvm on none of its own paths (the system python3 of the LSF and PBS hooks).
_MAKER = """\
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from blahvm.lifecycle.templates import _main
sys.exit(_main(sys.argv[2:]))
"""


def make_in_background(config: SiteConfig, environment: Environment, shape: Shape) -> int:
    """Start a process of its own that makes the template (the job that needed it has booted);
    returns its pid. It outlives the prologue; if it is killed, reap cleans up after it."""
    import subprocess
    import sys

    from blahvm.config.dump import dump_config

    process = subprocess.Popen(
        [sys.executable, "-IS", "-c", _MAKER, json.dumps(sys.path), environment.name, str(int(shape.memory)),
         str(shape.vcpus)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True,
    )
    # marked while it waits for its config: whoever asks after this prepare returns knows it works
    marker = _maker_path(config, process.pid, _start_time(process.pid))
    with contextlib.suppress(OSError, TemplateUnusable):
        _ensure_root(config, make_state_dir=False)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        process.stdin.write(dump_config(config).encode("utf-8"))
        process.stdin.close()
    except BrokenPipeError:
        pass  # it died at its start: the check below takes its mark away
    if process.poll() is not None:  # it ended before its mark was there for it to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
    return process.pid


def _main(argv: List[str]) -> int:
    import sys

    from blahvm.config import parse_config
    from blahvm.hypervisor.images import verify_image
    from blahvm.lifecycle._common import connect

    _stop_cleanly_on_signals()
    config = parse_config(sys.stdin.buffer.read())
    environment = config.environments[argv[0]]
    shape = Shape(Size(int(argv[1])), int(argv[2]))
    try:
        if not os.path.isdir(config.host.state_dir):  # its site is gone: make nothing of it again
            return 1
        golden = verify_image(environment.name, environment.image, environment.sha256, config.host.state_dir)
        with connect(config) as conn:
            make(config, conn, environment, golden, shape, background=True)
        return 0
    finally:  # its guest, volume and run dir are gone by now: it no longer works
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_maker_path(config, os.getpid(), _start_time(os.getpid())))


class _Stopped(BaseException):
    """A signal asked the maker to stop: its cleanup runs on the way out."""


def _stop_cleanly_on_signals() -> None:
    """SIGTERM, SIGINT, SIGHUP unwind the maker through its cleanup (their default would end it on
    the spot); a second one during the cleanup is ignored."""
    import signal

    def stop(signum, _frame):
        for other in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise _Stopped(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
