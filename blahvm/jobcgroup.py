"""Putting a process into the cgroups another process is in: how a job's guest becomes its batch job's.

A batch system that tracks, accounts and limits a job by cgroups (Slurm's ``proctrack/cgroup``,
``jobacct_gather/cgroup``, ``task/cgroup``) sees a guest's QEMU only once QEMU's threads are in the
job's cgroups. Which cgroups those are is read from a process the batch system itself placed there
(Slurm's extern step placeholder), not from the batch system's path layout, so the same code serves
cgroup v1 (one hierarchy per controller, as on hosts without systemd) and v2 (one unified tree).

Parsing (``parse_cgroup``, ``parse_mountinfo``, ``targets``, ``tightest_limit``) is pure. ``join``
moves a process: on v1 every thread, one tid per write to each hierarchy's ``tasks`` (a v1 cgroup
holds threads, and QEMU's vcpus are threads); on v2 the process, whole, into ``cgroup.procs``. Each
file is opened under a descriptor of its cgroup directory, never through a symlink. Runs as root.
Only v1 is exercised on a real batch system here; v2 is covered by unit tests alone.
"""

from __future__ import annotations

import errno
import os
from typing import Iterable, List, Optional, Tuple

import attrs

# The v1 controllers a guest joins. Never ``devices``: a job's device list would take /dev/kvm and
# /dev/net/tun away from QEMU. Named hierarchies (name=systemd) carry no controller and are left alone.
JOINED = ("memory", "cpu", "cpuacct", "cpuset", "blkio", "pids", "freezer")  # memory first, freezer last
V1_FILE = "tasks"
V2_FILE = "cgroup.procs"
UNLIMITED = 1 << 62  # v1 writes "no limit" as a page-rounded LONG_MAX; anything this large is none


class CgroupError(Exception):
    """A process could not be placed: one line that says which cgroup and why."""


@attrs.frozen
class Membership:
    """One line of ``/proc/PID/cgroup``: hierarchy id, its controllers (none on v2) and the path in it."""

    hierarchy: int
    controllers: Tuple[str, ...]
    path: str


@attrs.frozen
class Mount:
    """A cgroup filesystem mounted here: which subtree of which hierarchy (``root``) is at ``point``."""

    version: int  # 1 or 2
    controllers: Tuple[str, ...]  # v1: those of its hierarchy (name=... included); v2: ()
    root: str
    point: str


@attrs.frozen
class Target:
    """A cgroup directory to move a process into, through ``file`` (``tasks``: one thread per write)."""

    directory: str
    file: str
    controllers: Tuple[str, ...]

    @property
    def per_thread(self) -> bool:
        return self.file == V1_FILE


def parse_cgroup(text: str) -> Tuple[Membership, ...]:
    """``/proc/PID/cgroup`` (pure). A malformed line is a ``CgroupError``."""
    found = []
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            raise CgroupError(f"not a /proc/PID/cgroup line: {line[:120]!r}")
        controllers = tuple(sorted(c for c in parts[1].split(",") if c))
        found.append(Membership(int(parts[0]), controllers, parts[2]))
    return tuple(found)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> Tuple[Mount, ...]:
    """The cgroup mounts in ``/proc/self/mountinfo`` (pure)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 6 or len(fields) < dash + 4:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(Mount(2, (), root, point))
        elif fstype == "cgroup":
            # super options: rw plus the hierarchy's controllers; xattr and the like are not controllers
            names = tuple(sorted(o for o in options if o in JOINED or o.startswith("name=") or o in
                                 ("devices", "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc")))
            mounts.append(Mount(1, names, root, point))
    return tuple(mounts)


def _within(path: str, root: str) -> Optional[str]:
    """``path`` relative to ``root`` ('' for root itself), or None when outside it."""
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def targets(memberships: Iterable[Membership], mounts: Iterable[Mount],
            controllers: Iterable[str] = JOINED, roots: bool = False) -> Tuple[Target, ...]:
    """Where to move a process so it shares ``memberships`` (another process's) for ``controllers`` (pure).

    A hierarchy whose cgroup is its root is skipped (unless ``roots``): the batch system does not use
    it, and moving a guest there would only take it out of what libvirt set. A hierarchy the reference is in but that
    is not mounted here is a ``CgroupError``. v1 targets come memory first and freezer last, in
    ``controllers``' order: a refused memory move leaves everything else as it was, and a frozen job
    freezes the guest only once it is all in."""
    wanted = tuple(controllers)
    mounts = tuple(mounts)
    found: List[Tuple[int, Target]] = []
    for member in memberships:
        if member.path == "/" and not roots:
            continue
        if member.hierarchy == 0 and not member.controllers:  # the unified (v2) tree
            mount = next((m for m in mounts if m.version == 2 and _within(member.path, m.root) is not None), None)
            if mount is None:
                raise CgroupError(f"cgroup v2 path {member.path} is not under any cgroup2 mount here")
            relative = _within(member.path, mount.root)
            found.append((-1, Target(os.path.join(mount.point, relative), V2_FILE, ())))
            continue
        joined = [c for c in wanted if c in member.controllers]
        if not joined:
            continue
        mount = next((m for m in mounts if m.version == 1 and m.controllers == member.controllers
                      and _within(member.path, m.root) is not None), None)
        if mount is None:
            raise CgroupError(f"cgroup v1 hierarchy {','.join(member.controllers)} ({member.path}) is not mounted here")
        relative = _within(member.path, mount.root)
        found.append((min(wanted.index(c) for c in joined),
                      Target(os.path.join(mount.point, relative), V1_FILE, member.controllers)))
    return tuple(target for _, target in sorted(found, key=lambda pair: pair[0]))


def leaving(mine: Iterable[Membership], init: Iterable[Membership], component: str) -> Tuple[Membership, ...]:
    """Init's cgroups for each hierarchy where ``mine`` lies in a cgroup named ``component`` (a batch job's,
    ``job_7``): where a helper process started from inside a job goes so that it holds none of the job's
    cgroups, which the batch system removes when the job ends (pure)."""
    theirs = {member.hierarchy: member for member in init}
    return tuple(theirs[member.hierarchy] for member in mine
                 if component in member.path.split("/") and member.hierarchy in theirs)


def tightest_limit(values: Iterable[Optional[str]]) -> Optional[int]:
    """The lowest memory limit among a cgroup's and its ancestors' (``memory.limit_in_bytes`` on v1,
    ``memory.max`` on v2); None when none limits (pure)."""
    limits = [int(v) for v in (value.strip() if value else "" for value in values) if v.isdigit()]
    limits = [v for v in limits if v < UNLIMITED]
    return min(limits) if limits else None


# -- side effects --------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as stream:
        return stream.read()


def memberships_of(pid: int) -> Tuple[Membership, ...]:
    try:
        return parse_cgroup(_read(f"/proc/{int(pid)}/cgroup"))
    except OSError as error:
        raise CgroupError(f"cannot read the cgroups of process {pid}: {error.strerror or error}") from None


def mounts_here() -> Tuple[Mount, ...]:
    return parse_mountinfo(_read("/proc/self/mountinfo"))


def memory_limit(places: Iterable[Target], mounts: Iterable[Mount]) -> Optional[int]:
    """The memory limit a process moved to ``places`` would live under (its cgroup's and every ancestor's
    up to the mount point), or None if there is none or no memory cgroup among them."""
    for target in places:
        if target.file == V1_FILE and "memory" not in target.controllers:
            continue
        name = "memory.limit_in_bytes" if target.file == V1_FILE else "memory.max"
        point = next((m.point for m in mounts if target.directory == m.point
                      or target.directory.startswith(m.point.rstrip("/") + "/")), None)
        values, directory = [], target.directory
        while True:
            try:
                values.append(_read(os.path.join(directory, name)))
            except OSError:
                pass
            if point is None or directory.rstrip("/") == point.rstrip("/") or directory in ("/", ""):
                break
            directory = os.path.dirname(directory)
        return tightest_limit(values)
    return None


def _write_ids(directory: str, file: str, ids: Iterable[int], what: str) -> int:
    """Write each id in its own write() to ``directory/file``, opened under the directory's descriptor
    without following symlinks; ids that have exited meanwhile are skipped. The number moved."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CgroupError(f"cgroup {directory}: {error.strerror or error}") from None
    moved = 0
    try:
        fd = os.open(file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            for one in ids:
                try:
                    os.write(fd, str(int(one)).encode())
                    moved += 1
                except OSError as error:
                    if error.errno == errno.ESRCH:  # that thread ended meanwhile
                        continue
                    raise CgroupError(f"cannot move {what} into {directory}: {error.strerror or error}") from None
        finally:
            os.close(fd)
    except OSError as error:
        raise CgroupError(f"cgroup {directory}/{file}: {error.strerror or error}") from None
    finally:
        os.close(dir_fd)
    return moved


def threads_of(pid: int) -> List[int]:
    try:
        return sorted(int(tid) for tid in os.listdir(f"/proc/{int(pid)}/task") if tid.isdigit())
    except OSError:
        return []


def join(pid: int, places: Iterable[Target], *, charge_memory: bool = True) -> None:
    """Move process ``pid`` (all of it) into every cgroup of ``places``. On v1, thread by thread, again
    until a pass finds no thread it had not moved (threads a process starts meanwhile); with
    ``charge_memory`` the v1 memory cgroup first gets ``memory.move_charge_at_immigrate`` = 3, so the
    pages the process already holds (a guest's memory) are charged there too, not only new ones (the
    kernel then refuses the move with "Cannot allocate memory" if they do not fit under its limit);
    kernels that no longer move charges (6.18 here refuses the setting) leave those pages charged
    where they were, and the job's cgroup counts only what the process touches from then on.
    A ``CgroupError`` names the cgroup that refused; what was moved before it stays moved."""
    for target in places:
        what = f"process {pid}"
        if not target.per_thread:
            _write_ids(target.directory, target.file, [pid], what)
            continue
        if charge_memory and "memory" in target.controllers:
            try:  # deprecated since Linux 6.8; later kernels refuse it (EINVAL), and then only new pages count
                _write_ids(target.directory, "memory.move_charge_at_immigrate", [3], "the charge setting")
            except CgroupError:
                pass
        done: set = set()
        for _ in range(20):
            tids = [tid for tid in threads_of(pid) if tid not in done]
            if not tids:
                break
            # the leader first: v1 moves a process's memory charge only with its thread-group leader
            tids.sort(key=lambda tid: tid != pid)
            _write_ids(target.directory, target.file, tids, what)
            done.update(tids)
        if not done:
            raise CgroupError(f"process {pid} is gone")


def frozen_state(text: str, file: str) -> bool:
    """Whether a v1 ``freezer.state`` or a v2 ``cgroup.events`` says its cgroup is frozen or freezing (pure)."""
    if file == "freezer.state":
        return text.strip() in ("FROZEN", "FREEZING")
    return any(line.split() == ["frozen", "1"] for line in text.splitlines())


def frozen(pid: int) -> bool:
    """Whether process ``pid`` is in a frozen (or freezing) cgroup: a job the batch system suspended. A
    frozen QEMU answers no monitor command, so libvirt calls that need one wait until it thaws."""
    try:
        memberships, mounts = memberships_of(pid), mounts_here()
        places = targets(memberships, mounts, controllers=("freezer",))
    except (CgroupError, OSError):
        return False
    for place in places:
        file = "freezer.state" if place.per_thread else "cgroup.events"
        try:
            if frozen_state(_read(os.path.join(place.directory, file)), file):
                return True
        except OSError:
            continue
    return False


def leave_job(component: str) -> None:
    """Move this process out of every cgroup of the job named ``component`` into init's (see ``leaving``)."""
    mounts = mounts_here()
    places = targets(leaving(memberships_of(os.getpid()), memberships_of(1), component), mounts,
                     controllers=JOINED + ("devices",), roots=True)
    join(os.getpid(), places, charge_memory=False)
