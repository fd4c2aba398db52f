"""A seccomp filter that refuses set-id mode bits: chmod-family calls, and file, directory and node
creation whose mode has S_ISUID or S_ISGID, fail with EPERM; openat2 (whose mode hides behind a
pointer the filter cannot read) fails with ENOSYS, so glibc falls back to openat.

Installed by the jail just before it runs virtiofsd: a filter survives exec, and virtiofsd's own
allowlist stacks on top of it (the kernel takes the strictest answer, so an EPERM here stays one).
Classic BPF assembled here with struct; stdlib only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from typing import Dict, List, Tuple

SETID_BITS = 0o6000  # S_ISUID | S_ISGID
O_CREAT = 0o100
O_TMPFILE = 0o20000000  # with O_DIRECTORY; either bit means "mode is used"

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_NR, _ARCH = 0, 4  # offsets in struct seccomp_data


def _arg(index: int) -> int:
    return 16 + 8 * index  # low 32 bits of args[index] (little-endian)


# name -> (index of the flags argument or None, index of the mode argument) for calls that take a mode
_MODE_CALLS = {
    "chmod": (None, 1), "fchmod": (None, 1), "fchmodat": (None, 2), "fchmodat2": (None, 2),
    "creat": (None, 1), "open": (1, 2), "openat": (2, 3),
    "mkdir": (None, 1), "mkdirat": (None, 2), "mknod": (None, 1), "mknodat": (None, 2),
}
# syscall numbers by audit arch; a call the arch lacks is simply absent
ARCHES: Dict[str, Tuple[int, Dict[str, int], int]] = {
    "x86_64": (0xC000003E, {
        "open": 2, "chmod": 90, "fchmod": 91, "creat": 85, "mkdir": 83, "mknod": 133, "openat": 257,
        "mkdirat": 258, "mknodat": 259, "fchmodat": 268, "openat2": 437, "fchmodat2": 452,
    }, 0x40000000),  # x32 calls carry this bit: refused outright
    "aarch64": (0xC00000B7, {
        "mknodat": 33, "mkdirat": 34, "fchmod": 52, "fchmodat": 53, "openat": 56, "openat2": 437,
        "fchmodat2": 452,
    }, 0),
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(arch: str = "") -> List[bytes]:
    """The filter's instructions for ``arch`` (default: this machine's)."""
    audit_arch, numbers, x32_bit = ARCHES[arch or platform.machine()]
    deny = _insn(_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)
    allow = _insn(_RET_K, SECCOMP_RET_ALLOW)
    program = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, audit_arch, jt=1),  # another ABI (i386 on x86_64): nothing virtiofsd uses
        _insn(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        _insn(_LD_W_ABS, _NR),
    ]
    if x32_bit:
        program += [_insn(_JSET_K, x32_bit, jf=1), _insn(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    if "openat2" in numbers:
        program += [_insn(_JEQ_K, numbers["openat2"], jf=1), _insn(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    # One block per call: [nr == N?] [flags say no mode? -> allow] [mode has set-id bits? -> deny] allow
    for name, (flags_arg, mode_arg) in sorted(_MODE_CALLS.items()):
        if name not in numbers:
            continue
        block = []
        if flags_arg is not None:
            block += [_insn(_LD_W_ABS, _arg(flags_arg)), _insn(_JSET_K, O_CREAT | O_TMPFILE, jf=3)]
        block += [_insn(_LD_W_ABS, _arg(mode_arg)), _insn(_JSET_K, SETID_BITS, jt=0, jf=1), deny, allow]
        program += [_insn(_JEQ_K, numbers[name], jf=len(block))] + block
    program.append(allow)
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(arch: str = "") -> None:
    """Install the filter on the calling thread (and what it execs); no new privileges from here."""
    program = b"".join(build_filter(arch))
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"seccomp filter: {os.strerror(error)}")
