"""The program libvirt starts instead of virtiofsd, and the check that it serves what was pinned.

libvirt 9.0 runs ``<binary path=...>`` as root with ``--fd=N -o source=PATH,...`` (it probes
nothing when a binary is given, writes the pidfile itself and kills the process group at stop).
``main`` then, with the pid libvirt recorded:

1. reads the job's identity from the root-only file ``pin`` wrote beside the mount point named
   by ``source`` (never anything the job's user can write), and records its own pid there;
2. enters a new user namespace and mount namespace; a helper forked before, still in the host's
   namespace, writes the maps: the job's uid and gids, identity-mapped, nothing else;
3. in its own mount namespace binds the pinned directory over the share root, so virtiofsd reaches
   it through directories anyone may traverse while the share root stays root's alone;
4. becomes the job's uid and gids, keeps the capabilities virtiofsd needs as ambient ones (they
   count only for files the namespace maps: the job's own), installs ``seccomp``'s filter, and
   execs virtiofsd with fixed options and an empty environment.

A guest request as uid 0 (or any other unmapped id) then fails in virtiofsd's setresuid, a chown
to an unmapped id fails, and set-id bits fail in the filter: the kernel refuses them, not blahvm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import sys
import time
from typing import List, Optional, Sequence, Tuple

from blahvm.jobshare import mounts, seccomp
from blahvm.jobshare.pinning import IDENTITY, MOUNT, PIDFILE, Identity, read_identity, read_private

WRAPPER = "virtiofsd-jail"
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VHOST_USER_DIRS = ("/etc/qemu/vhost-user", "/usr/share/qemu/vhost-user")
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
SECBIT_NO_SETUID_FIXUP = 1 << 2
CAP_LAST = 40
# setup_capabilities() in QEMU 7.2's passthrough_ll.c keeps exactly the first eight and fails unless
# they are permitted. It drops the rest before serving: CAP_SYS_ADMIN is for its namespace sandbox,
# CAP_SETPCAP for libcap-ng 0.8.3's capng_apply(CAPNG_SELECT_BOTH), which without it reads
# /proc/self/exe for a warning, a syscall virtiofsd's own seccomp allowlist kills it for.
CAPS = {"chown": 0, "dac_override": 1, "fowner": 3, "fsetid": 4, "setgid": 6, "setuid": 7,
        "mknod": 27, "setfcap": 31, "setpcap": 8, "sys_admin": 21}
_GUEST = re.compile(r"blahvm-[A-Za-z0-9_.-]+\Z")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


class JailError(Exception):
    pass


# -- what libvirt hands over ---------------------------------------------------------------------


def split_options(text: str) -> List[str]:
    """QEMU-style options: commas separate, a doubled comma is a literal one."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    return parts


def parse_libvirt_argv(argv: Sequence[str], root: str) -> Tuple[int, str]:
    """(the vhost-user socket's fd, the guest) from libvirt's arguments; the source must be a mount
    point directly under ``root``."""
    fd, source = None, None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("--fd="):
            fd = int(arg[5:]) if arg[5:].isdigit() else None
        elif arg == "-o" and i + 1 < len(args):
            for option in split_options(args[i + 1]):
                if option.startswith("source="):
                    source = option[len("source="):]
    if fd is None or source is None:
        raise JailError(f"expected --fd=N and -o source=PATH from libvirt, got {list(argv)!r}")
    guest_dir, leaf = os.path.split(source)
    parent, guest = os.path.split(guest_dir)
    if leaf != MOUNT or parent != root or not _GUEST.match(guest):
        raise JailError(f"source {source!r} is not a job share under {root}")
    return fd, guest


def virtiofsd_argv(binary: str, fd: int, source: str) -> List[str]:
    """Fixed options: the namespace sandbox, no xattrs (so no file capabilities), and caps dropped
    that nothing here needs."""
    options = f"source={source},sandbox=namespace,no_xattr,cache=auto"
    return [binary, f"--fd={fd}", "-o", options]


# -- the jail --------------------------------------------------------------------------------------


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_caps(caps: Sequence[int]) -> None:
    mask = sum(1 << cap for cap in caps)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if _libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")


def _map_from_parent(identity: Identity) -> Tuple[int, int]:
    """Fork a helper that stays in this namespace and, once told, writes the child's maps."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        os.close(ready_w)
        code = 1
        try:
            if os.read(ready_r, 1) == b"x":
                target = os.getppid()
                with open(f"/proc/{target}/uid_map", "w") as stream:
                    stream.write(f"{identity.uid} {identity.uid} 1\n")
                with open(f"/proc/{target}/gid_map", "w") as stream:
                    stream.write("".join(f"{gid} {gid} 1\n" for gid in sorted(set(identity.gids))))
                code = 0
        except BaseException as error:  # noqa: BLE001  (the helper reports and exits, whatever it is)
            sys.stderr.write(f"blahvm virtiofsd jail: cannot write the id maps: {error}\n")
        os._exit(code)
    os.close(ready_r)
    return pid, ready_w


def enter(identity: Identity, root: str, guest: str) -> None:
    """Steps 2-4 of the module docstring, up to (not including) the exec."""
    helper, ready = _map_from_parent(identity)
    try:
        _unshare(CLONE_NEWUSER | CLONE_NEWNS)
        os.write(ready, b"x")
    finally:
        os.close(ready)
    _, status = os.waitpid(helper, 0)
    if status != 0:
        raise JailError("the id maps were not written")
    # only this namespace: none of it reaches the host's mounts
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_SLAVE)
    mounts.mount(os.path.join(root, guest, MOUNT), root, None, mounts.MS_BIND)
    shown = os.stat(root)
    if (shown.st_dev, shown.st_ino) != (identity.dev, identity.ino):
        raise JailError(f"{root} shows another directory than the one pinned for {guest}")
    _prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP)
    os.setgroups(list(identity.gids))
    os.setresgid(identity.gids[0], identity.gids[0], identity.gids[0])
    os.setresuid(identity.uid, identity.uid, identity.uid)
    needed = sorted(CAPS.values())
    for cap in range(CAP_LAST + 1):
        if cap not in needed:
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError:  # a capability this kernel does not know
                pass
    _set_caps(needed)
    for cap in needed:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    seccomp.install()


def main(argv: Sequence[str], root: str, virtiofsd: str) -> int:
    """The jail's entry point (the installed wrapper calls it); never returns on success."""
    try:
        fd, guest = parse_libvirt_argv(argv, root)
        identity = read_identity(root, guest)
        pidfile = os.path.join(root, guest, PIDFILE)
        with open(pidfile, "w", encoding="ascii", opener=_private_opener) as stream:
            stream.write(f"{os.getpid()}\n")
        enter(identity, root, guest)
        os.execve(virtiofsd, virtiofsd_argv(virtiofsd, fd, root), {"LC_ALL": "C"})
    except (JailError, OSError, ValueError, KeyError) as error:
        sys.stderr.write(f"blahvm virtiofsd jail: {error}\n")
        return 1
    return 1  # not reached


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


# -- installing it -----------------------------------------------------------------------------------


def find_virtiofsd() -> str:
    """virtiofsd as QEMU's vhost-user descriptors name it (the highest priority first)."""
    for directory in VHOST_USER_DIRS:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as stream:
                    descriptor = json.load(stream)
            except (OSError, ValueError):
                continue
            if isinstance(descriptor, dict) and descriptor.get("type") == "fs" and descriptor.get("binary"):
                return str(descriptor["binary"])
    return DEFAULT_VIRTIOFSD


def _import_paths() -> list:
    import attrs

    import blahvm

    return list(dict.fromkeys(os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))
                              for module in (blahvm, attrs)))


def wrapper_text(root: str, virtiofsd: str, python: str) -> str:
    """The wrapper: interpreter isolated (-I: no environment, no user site, no current directory)."""
    for value in (root, virtiofsd, python):
        if not os.path.isabs(value) or any(c in value for c in "\n\r'\\"):
            raise ValueError(f"{value!r} cannot be written into the virtiofsd wrapper")
    return (
        f"#!{python} -I\n"
        "# Written by blahvm: runs virtiofsd for one job's share, jailed (blahvm.jobshare.jail).\n"
        "import sys\n"
        # where this blahvm and attrs live: a hook's interpreter (/usr/bin/python3 -IS) may not find them
        f"sys.path[:0] = {_import_paths()!r}\n"
        "from blahvm.jobshare import jail\n"
        f"sys.exit(jail.main(sys.argv[1:], root='{root}', virtiofsd='{virtiofsd}'))\n"
    )


def install(root: str, virtiofsd: Optional[str] = None, python: Optional[str] = None) -> str:
    """Write the wrapper into the share root (root's, 0700) unless it is there already; its path."""
    path = os.path.join(root, WRAPPER)
    text = wrapper_text(root, virtiofsd or find_virtiofsd(), python or sys.executable)
    try:
        if read_private(path) == text:
            return path
    except (OSError, ValueError):
        pass
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.chmod(temporary, 0o700)
    os.replace(temporary, path)
    return path


# -- checking it serves what was pinned ----------------------------------------------------------


def served(root: str, guest: str) -> Optional[Tuple[int, dict]]:
    """(pid, facts) of the virtiofsd process serving ``guest``'s share, or None if none yet.

    Facts: the device and inode of its root (after pivot_root, the exported directory), its uid
    map and its uids, as the host's /proc shows them.
    """
    try:
        wrapper_pid = int(read_private(os.path.join(root, guest, PIDFILE)).strip())
    except (OSError, ValueError):
        return None
    for pid in [wrapper_pid, *_children(wrapper_pid)]:
        try:
            status = os.stat(f"/proc/{pid}/root")
            with open(f"/proc/{pid}/uid_map", encoding="ascii") as stream:
                uid_map = " ".join(stream.read().split())
            with open(f"/proc/{pid}/status", encoding="ascii") as stream:
                uids = next(line.split()[1:] for line in stream if line.startswith("Uid:"))
            exe = os.readlink(f"/proc/{pid}/exe")
        except (OSError, StopIteration):
            continue
        if pid != wrapper_pid:  # the sandboxed child: virtiofsd's root is the share
            return pid, {"dev": status.st_dev, "ino": status.st_ino, "uid_map": uid_map,
                         "uids": [int(u) for u in uids], "exe": exe}
    return None


def _children(pid: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="latin-1") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(pid):
                found.append(int(name))
    return found


def verify_served(root: str, guest: str, timeout: float = 10.0) -> Optional[str]:
    """None if ``guest``'s virtiofsd runs jailed on the pinned directory; else what is wrong."""
    identity = read_identity(root, guest)
    deadline = time.monotonic() + timeout
    facts = served(root, guest)
    while facts is None and time.monotonic() < deadline:
        time.sleep(0.05)
        facts = served(root, guest)
    if facts is None:
        return "no jailed virtiofsd serves it"
    pid, seen = facts
    if (seen["dev"], seen["ino"]) != (identity.dev, identity.ino):
        return f"virtiofsd {pid} exports another directory than the one checked"
    if seen["uid_map"] != f"{identity.uid} {identity.uid} 1" or set(seen["uids"]) != {identity.uid}:
        return f"virtiofsd {pid} does not run as the job's uid alone (map {seen['uid_map']!r})"
    return None


__all__ = ["IDENTITY", "install", "main", "verify_served", "served", "WRAPPER"]
