"""The run-dir root (``host.run_dir``) and the jobs' run dirs in it, never through a symlink.

Root makes, chowns and removes run dirs there. Whoever could write the root, or a directory on
the way to it, could put a symlink where a job's run dir goes and have root chown or remove what
it points to. So the root must be root's alone, as the state dir is (owned by root, not writable
by group or others; made 0755 when missing), and everything in it is reached by name from a file
descriptor of the root opened with O_NOFOLLOW: no path a symlink could redirect.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from typing import Iterator, Sequence

from blahvm.trust import directory_problem, status_problem

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeRunDir(OSError):
    """The run-dir root is not root's alone: a fault of this host's setup (retry elsewhere)."""


def check_root(root: str) -> None:
    """Make the root if missing (0755: users enter their own run dirs) and check it is root's alone."""
    with open_root(root, create=True):
        pass


@contextlib.contextmanager
def open_root(root: str, create: bool = False) -> Iterator[int]:
    """A descriptor of the checked root; raises ``UnsafeRunDir`` (or FileNotFoundError, not creating)."""
    if create and not os.path.lexists(root):
        os.makedirs(root, mode=0o755, exist_ok=True)
        os.chmod(root, 0o755)  # whatever the umask (a PBS mom runs prologues with 077)
    problem = directory_problem(root)
    if problem is None:
        try:
            fd = os.open(root, _DIRECTORY)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            problem = f"{root} is a symbolic link: name the directory itself"
    if problem is not None:
        raise UnsafeRunDir(f"host.run_dir {root}: {problem}: it must be root's alone (chown root:root; chmod 0755)")
    try:
        # Not even sticky (/tmp): there users could take the names blahvm puts beside run dirs.
        problem = status_problem(os.fstat(fd), sticky_ok=False)
        if problem is not None:
            raise UnsafeRunDir(f"host.run_dir {root} {problem}: it must be root's alone (chown root:root; chmod 0755)")
        yield fd
    finally:
        os.close(fd)


def make(root: str, run_dir: str) -> None:
    """The job's run dir, root's alone (0700) until its sockets are handed over; one left by an
    earlier run of the job (which the live entry now owns) is removed first."""
    name = _name_in(root, run_dir)
    with open_root(root, create=True) as root_fd:
        _remove_entry(root_fd, name)
        os.mkdir(name, 0o700, dir_fd=root_fd)
        fd = os.open(name, _DIRECTORY, dir_fd=root_fd)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask
        finally:
            os.close(fd)


def hand_over(run_dir: str, sockets: Sequence[str], uid: int, gid: int) -> None:
    """Give the sockets (those that exist), then the run dir itself, to ``uid``:``gid``."""
    root = os.path.dirname(run_dir)
    with open_root(root) as root_fd:
        fd = os.open(_name_in(root, run_dir), _DIRECTORY, dir_fd=root_fd)
        try:
            for path in sockets:
                # the run dir is still root's alone (0700): the socket checked is still there
                _give_socket(fd, _name_in(run_dir, path), path, uid, gid)
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)


def keep_socket(root: str, path: str) -> None:
    """Make the socket ``path``, directly in the root, root's alone (0600): libvirt made it
    QEMU's user's, group-writable (a driver without channels makes none)."""
    with open_root(root) as root_fd:
        _give_socket(root_fd, _name_in(root, path), path, 0, 0)


def _give_socket(dir_fd: int, name: str, path: str, uid: int, gid: int) -> None:
    """The socket ``name`` in ``dir_fd`` (a directory only root can change) to uid:gid, 0600."""
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise UnsafeRunDir(f"{path} is not a socket: refusing to hand it over")
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    os.chmod(name, 0o600, dir_fd=dir_fd)


def remove(root: str, run_dir: str) -> None:
    """Remove the run dir (whatever its owner put in it) without following a symlink; gone is fine."""
    try:
        with open_root(root) as root_fd:
            _remove_entry(root_fd, _name_in(root, run_dir))
    except FileNotFoundError:
        pass  # no root: nothing to remove


def _remove_entry(root_fd: int, name: str) -> None:
    try:
        status = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(status.st_mode):
        # fd-based: never follows a symlink inside; the job's user owns what is in it by now
        shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)
    else:
        os.unlink(name, dir_fd=root_fd)  # a symlink (or anything else) is removed, never followed


def _name_in(directory: str, path: str) -> str:
    parent, name = os.path.split(os.path.normpath(path))
    if parent != os.path.normpath(directory) or name in ("", ".", ".."):
        raise ValueError(f"{path} is not directly in {directory}")
    return name
