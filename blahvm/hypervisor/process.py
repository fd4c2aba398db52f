"""A running guest's QEMU process on this host: its pid, and the CPU time of all its threads.

libvirt's QEMU driver writes each running domain's pid to ``<run dir>/qemu/NAME.pid`` (``/run/libvirt``
for ``qemu:///system``); the pid is trusted only if that process's command line names the guest, so a
stale file never points at another process. Xen and the test driver have no such process: None.
``cpu_seconds_of`` reads ``/proc/PID/stat`` (user + system time of every thread, those that ended
included), which stays right wherever the process's cgroups are; libvirt's ``cpu.time`` reads its own
cgroup of the guest and stops counting threads moved out of it (into a batch job's, ``blahvm.jobcgroup``).
"""

from __future__ import annotations

import os
from typing import Optional

from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.naming import check_safe_name

SYSTEM_RUN_DIR = "/run/libvirt/qemu"


def _run_dir(uri: str) -> Optional[str]:
    if uri.split("+", 1)[0].split(":", 1)[0] == "qemu" and uri.rstrip("/").endswith("/system") and "://" in uri:
        host = uri.split("://", 1)[1].split("/", 1)[0]
        return SYSTEM_RUN_DIR if host == "" else None  # a remote libvirtd's processes are not ours to read
    return None


def names_guest(cmdline: bytes, name: str) -> bool:
    """Whether a ``/proc/PID/cmdline`` is QEMU's for guest ``name`` (``-name guest=NAME,...``) (pure)."""
    words = cmdline.split(b"\0")
    for i, word in enumerate(words[:-1]):
        if word == b"-name":
            value = words[i + 1]
            if value.startswith(b"guest="):
                value = value[len(b"guest="):]
            return value.split(b",", 1)[0] == name.encode()
    return False


def qemu_pid(conn: Connection, name: str) -> Optional[int]:
    """The pid of guest ``name``'s QEMU on this host; None when it has none (not running, not QEMU, remote)."""
    check_safe_name(name)
    directory = _run_dir(conn.uri)
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, f"{name}.pid")) as stream:
            pid = int(stream.read().strip() or "0")
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            cmdline = stream.read()
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and names_guest(cmdline, name) else None


def cpu_seconds_in(stat: bytes, ticks: int) -> float:
    """User + system seconds in a ``/proc/PID/stat`` line (pure)."""
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of the line


def cpu_seconds_of(pid: int) -> Optional[float]:
    """All of process ``pid``'s CPU so far; None once it is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stream:
            return cpu_seconds_in(stream.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def is_vcpu_thread(comm: bytes) -> bool:
    """QEMU names its vcpu threads ``CPU N/KVM`` or ``CPU N/TCG`` (libvirt starts it with debug-threads=on) (pure)."""
    head, _, accel = comm.partition(b"/")
    return head.startswith(b"CPU ") and head[4:].isdigit() and bool(accel)


def vcpu_seconds_of(pid: int) -> Optional[float]:
    """The CPU time of QEMU's vcpu threads (``schedstat``'s run time, as libvirt's ``vcpu.N.time``); None if none."""
    total, found = 0, False
    try:
        tids = os.listdir(f"/proc/{int(pid)}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{int(pid)}/task/{tid}/comm", "rb") as stream:
                if not is_vcpu_thread(stream.read().strip()):
                    continue
            with open(f"/proc/{int(pid)}/task/{tid}/schedstat") as stream:
                total += int(stream.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total * 1e-9 if found else None


def resident_bytes_of(pid: int) -> Optional[int]:
    """QEMU's resident memory now (``VmRSS``), as libvirt's ``balloon.rss``; None once it is gone."""
    try:
        with open(f"/proc/{int(pid)}/status") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
