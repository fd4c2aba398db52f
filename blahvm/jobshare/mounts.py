"""mount(2), umount2(2) and /proc/self/mountinfo, for the bind mounts of job directories."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from typing import List, Optional

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# statvfs f_flag bits -> the mount flags a bind mount must keep (a read-only source stays read-only)
_KEPT_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _path(path: Optional[str]) -> Optional[bytes]:
    return None if path is None else os.fsencode(path)


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int) -> None:
    if _libc.mount(_path(source), _path(target), _path(fstype), flags, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    if _libc.umount2(_path(target), flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"umount {target}: {os.strerror(error)}")


def bind_fd(fd: int, target: str) -> None:
    """Bind the directory open as ``fd`` (never a path that could change) onto ``target``, nosuid and
    nodev, keeping read-only, noexec and the atime flags of the mount it is on."""
    kept = os.statvfs(fd).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    for statvfs_flag, mount_flag in _KEPT_FLAGS:
        if kept & statvfs_flag:
            flags |= mount_flag
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    try:
        mount(None, target, None, flags)  # a bind mount takes its flags only on a remount
    except OSError:
        umount(target)
        raise


_OCTAL = re.compile(r"\\([0-7]{3})")


def mount_points(mountinfo: str) -> List[str]:
    """The mount points listed in /proc/<pid>/mountinfo text (octal escapes decoded), in order."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            raw = _OCTAL.sub(lambda match: chr(int(match.group(1), 8)), fields[4])
            points.append(os.fsdecode(raw.encode("latin-1")))
    return points


def mount_options(mountinfo: str, point: str) -> Optional[str]:
    """The per-mount options (field 6) of the last mount on ``point``, or None."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 5 and mount_points(line) == [point]:
            found = fields[5]
    return found


def read_mountinfo(pid: str = "self") -> str:
    with open(f"/proc/{pid}/mountinfo", encoding="latin-1") as stream:
        return stream.read()
