"""Pin the job's directory: check the very directory that will be exported, and export only that.

Layout under the share root (``<host.run_dir>-shares``, beside the run dirs, root's alone, 0700)::

    virtiofsd-jail           the program libvirt starts for every share (``jail.install``)
    <guest>/                 root 0700
    <guest>/mnt              the job's directory, bind-mounted from its checked descriptor
    <guest>/identity         root 0600: the uid, gids and device/inode the jail serves
    <guest>/virtiofsd.pid    root 0600: written by the jail, read by ``jail.verify_served``

Nothing under it is ever removed recursively: a mount point is unmounted, then ``rmdir``-ed, so a
failed unmount can never reach the job's own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Iterable, Iterator, List, Optional, Set, Tuple

import attrs

from blahvm.jobshare import mounts

SHARES_SUFFIX = "-shares"  # /run/blahvm -> /run/blahvm-shares: beside the run dirs, never inside one
MOUNT = "mnt"
IDENTITY = "identity"
PIDFILE = "virtiofsd.pid"
GUEST_PREFIX = "blahvm-"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ShareRefused(Exception):
    """The job's directory cannot be shared (a one-line reason): the job's own problem."""


@attrs.frozen
class Identity:
    """Who the share is served as, and which directory it must be."""

    uid: int
    gids: Tuple[int, ...]
    dev: int
    ino: int
    workdir: str  # for messages only: the directory is the inode, never this path

    def __attrs_post_init__(self) -> None:
        numbers = (self.uid, *self.gids, self.dev, self.ino)
        if not self.gids or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError(f"not a share identity: {self!r}")
        if self.uid == 0 or 0 in self.gids:
            raise ValueError("a job's share is never served as root")

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Identity":
        data = json.loads(text)
        return cls(data["uid"], tuple(data["gids"]), data["dev"], data["ino"], data["workdir"])


def share_root(run_dir: str) -> str:
    return os.path.normpath(run_dir) + SHARES_SUFFIX


def mount_point(root: str, guest: str) -> str:
    return os.path.join(root, guest, MOUNT)


def share_gids(gid: int, groups: Iterable[int]) -> Tuple[int, ...]:
    """The gids the share maps: the job's primary gid first, then its other groups, never root's."""
    return (gid, *sorted(set(groups) - {gid, 0}))


@contextlib.contextmanager
def _opened(path: str) -> Iterator[int]:
    fd = os.open(path, _OPEN_DIR)
    try:
        yield fd
    finally:
        os.close(fd)


def open_owned_dir(path: str, uid: int) -> int:
    """A descriptor of the directory ``path`` names now, checked on that descriptor: every
    component opened from ``/`` with O_NOFOLLOW after resolving the path once, so a link swapped in
    later fails instead of being followed. ShareRefused if it is missing or not ``uid``'s."""
    resolved = os.path.realpath(path)
    fd = os.open("/", _OPEN_DIR)
    try:
        for part in [part for part in resolved.split("/") if part]:
            try:
                child = os.open(part, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                raise ShareRefused("does not exist") from None
            except OSError as error:  # a link where the resolved path had a directory: swapped in since
                if _is_link(part, fd):
                    raise ShareRefused(f"changed while it was checked ({part!r} became a link)") from None
                if isinstance(error, NotADirectoryError):
                    raise ShareRefused("is not a directory") from None
                raise ShareRefused(f"cannot be opened: {os.strerror(error.errno)}") from None
            os.close(fd)
            fd = child
        status = os.fstat(fd)
        if status.st_uid != uid:
            raise ShareRefused(f"is owned by uid {status.st_uid}, not by the job's uid {uid}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def check_owned_dir(path: str, uid: Optional[int]) -> None:
    """``open_owned_dir`` without keeping the descriptor (prepare's early check, before a slot)."""
    if uid is None:
        raise ShareRefused("cannot be checked: the job has no uid")
    os.close(open_owned_dir(path, uid))


def ensure_root(root: str) -> None:
    """The share root, root's alone: made if missing, refused if anything else is there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    status = os.lstat(root)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != 0 or status.st_mode & 0o077:
        raise OSError(f"share root {root} is not a directory root alone may enter (0700, root)")


def pin(root: str, guest: str, workdir: str, uid: int, gids: Tuple[int, ...]) -> Identity:
    """Bind the checked ``workdir`` onto ``mount_point(root, guest)`` and record whom it is for.

    ShareRefused for the job's own bad directory; OSError for the host's problems. Whatever was
    made is undone before either is raised.
    """
    fd = open_owned_dir(workdir, uid)
    try:
        status = os.fstat(fd)
        identity = Identity(uid, gids, status.st_dev, status.st_ino, workdir)
        ensure_root(root)
        release(root, guest)  # what an earlier prepare of this job left
        guest_dir = os.path.join(root, guest)
        try:
            os.mkdir(guest_dir, 0o700)
            os.mkdir(os.path.join(guest_dir, MOUNT), 0o700)
            _write_private(os.path.join(guest_dir, IDENTITY), identity.to_json())
            mounts.bind_fd(fd, mount_point(root, guest))
            shown = os.stat(mount_point(root, guest))
            if (shown.st_dev, shown.st_ino) != (identity.dev, identity.ino):
                raise OSError(f"the bind mount on {mount_point(root, guest)} shows another directory")
        except BaseException:
            release(root, guest)
            raise
        return identity
    finally:
        os.close(fd)


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)


def read_private(path: str) -> str:
    """A file only root can have written: root's, not a link, no group or other write."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, encoding="utf-8") as stream:
        status = os.fstat(stream.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_uid != 0 or status.st_mode & 0o022:
            raise OSError(f"{path} is not a file only root can write")
        return stream.read()


def read_identity(root: str, guest: str) -> Identity:
    return Identity.from_json(read_private(os.path.join(root, guest, IDENTITY)))


def shared_mounts(root: str, mountinfo: Optional[str] = None) -> List[str]:
    """Mount points under the share root, deepest (last mounted) first."""
    text = mounts.read_mountinfo() if mountinfo is None else mountinfo
    base = os.path.realpath(root)
    return [p for p in reversed(mounts.mount_points(text)) if p.startswith(base + "/")]


def release(root: str, guest: str) -> bool:
    """Unmount the job's share and remove its entries; True if there was anything. Gone is fine."""
    guest_dir = os.path.join(os.path.realpath(root), guest)
    found = False
    for point in shared_mounts(root):
        if point == guest_dir or point.startswith(guest_dir + "/"):
            with contextlib.suppress(FileNotFoundError, OSError):
                mounts.umount(point)
            found = True
    if any(p == guest_dir or p.startswith(guest_dir + "/") for p in shared_mounts(root)):
        raise OSError(f"cannot unmount the share under {guest_dir}")
    try:
        dir_fd = os.open(guest_dir, _OPEN_DIR)
    except FileNotFoundError:
        return found
    try:
        for name in (IDENTITY, PIDFILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(MOUNT, dir_fd=dir_fd)  # never recursive: an empty mount point only
    finally:
        os.close(dir_fd)
    os.rmdir(guest_dir)
    return True


def leftovers(root: str, keep: Set[str]) -> List[str]:
    """Guests with a share (a mount or an entry under the share root) that ``keep`` does not name."""
    base = os.path.realpath(root)
    found = set()
    for point in shared_mounts(root):
        found.add(point[len(base) + 1:].split("/")[0])
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        found.update(name for name in os.listdir(base) if name.startswith(GUEST_PREFIX))
    return sorted(name for name in found if name not in keep)
