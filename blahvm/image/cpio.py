"""Writing the ``newc`` cpio archives the Linux kernel unpacks as its initramfs.

Written here rather than with cpio(1) so that device nodes (``/dev/console``) need no root and
the archive is the same bytes on every build (owner root, mtime 0).
"""

from __future__ import annotations

import stat
from typing import Iterable

import attrs

_MAGIC = b"070701"


@attrs.frozen
class Entry:
    """One archive member. ``data`` is a file's content or a symlink's target."""

    path: str  # relative, without a leading slash: "bin/busybox"
    mode: int  # type and permission bits, as in ``stat.S_IFREG | 0o755``
    data: bytes = b""
    rdev: tuple = (0, 0)  # (major, minor) of a device node

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> "Entry":
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> "Entry":
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> "Entry":
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> "Entry":
        return cls(path, stat.S_IFCHR | perm, b"", (major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check
    )
    header = _MAGIC + b"".join(b"%08X" % field for field in fields)
    return header + name + _pad(len(header) + len(name)) + entry.data + _pad(len(entry.data))


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """The archive of ``entries`` in order (parents before children), with its trailer."""
    members = []
    for ino, entry in enumerate(entries, start=1):
        if not entry.path or entry.path.startswith("/") or "\0" in entry.path:
            raise ValueError(f"cpio member path {entry.path!r} must be relative and non-empty")
        members.append(_member(ino, entry))
    members.append(_member(0, Entry("TRAILER!!!", 0)))
    return b"".join(members)
