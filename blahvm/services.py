"""Make sure the libvirt daemons answer, starting them on hosts without an init system that does.

Stdlib only: ``blahvm.hypervisor`` is the one package that imports libvirt; here we ask ``virsh``.
The daemons are never stopped from here: they are shared by every job on the host.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Optional, Sequence

VIRSH = "/usr/bin/virsh"
VIRTLOGD = "/usr/sbin/virtlogd"
LIBVIRTD = "/usr/sbin/libvirtd"
# libvirtd runs QEMU as a daemon (double fork), so a guest's QEMU is reparented to the nearest child
# subreaper, else to pid 1. Without an init system pid 1 may reap late: libvirt then waits for the
# exited QEMU's zombie to vanish, ~1.5 s of every teardown measured here. tini as a subreaper parent
# of libvirtd reaps QEMU at once, as systemd does on hosts that start libvirtd themselves.
TINI = "/usr/bin/tini"
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"  # its own output when it runs under tini, not daemonised

_POLL_SECONDS = 0.25
_ASK_SECONDS = 15  # one `virsh version` call; libvirtd's first start probes QEMU for ~12 s


class ServiceError(RuntimeError):
    """A daemon blahvm needs is missing or does not answer; the message says what to do."""


def ensure_libvirt(uri: str = "qemu:///system", timeout: float = 90, pid_dir: str = "/run") -> None:
    """Return once ``uri`` answers, starting virtlogd then libvirtd if they are not running.

    Safe to call at any time: daemons that already run are left alone. ``pid_dir`` holds the
    pid files of daemons started here (``virtlogd.pid``, ``libvirtd.pid``).
    """
    if _answers(uri) is None:
        return
    deadline = time.monotonic() + timeout
    # virtlogd first: without it every guest start fails on /run/libvirt/virtlogd-sock.
    for daemon in (VIRTLOGD, LIBVIRTD):
        if not running_processes(os.path.basename(daemon)):
            _start(daemon, os.path.join(pid_dir, os.path.basename(daemon) + ".pid"))
    while True:
        problem = _answers(uri)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"libvirt at {uri} does not answer after {timeout:g}s: {problem} "
                f"(see the libvirtd log; check `virsh -c {uri} version`)"
            )
        time.sleep(_POLL_SECONDS)


def _answers(uri: str) -> Optional[str]:
    """None when ``uri`` answers, otherwise the reason it does not (one line)."""
    if not os.access(VIRSH, os.X_OK):
        raise ServiceError(f"{VIRSH} not found: install libvirt-clients (scripts/install-system-packages)")
    try:
        done = subprocess.run(
            [VIRSH, "-c", uri, "version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_ASK_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return f"`virsh version` did not return within {_ASK_SECONDS}s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[0] if lines else f"virsh exited with status {done.returncode}"


def running_processes(name: str) -> Sequence[int]:
    """PIDs of processes whose command name is ``name``, from /proc (no pgrep needed)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as comm:
                if comm.read().strip() == name:
                    pids.append(int(entry))
        except OSError:  # the process went away while we looked
            continue
    return pids


def _start(daemon: str, pid_file: str) -> None:
    name = os.path.basename(daemon)
    if not os.access(daemon, os.X_OK):
        raise ServiceError(f"{daemon} not found: install libvirt-daemon-system (scripts/install-system-packages)")
    if os.geteuid() != 0:
        raise ServiceError(f"{name} is not running and only root can start it")
    if daemon == LIBVIRTD and os.access(TINI, os.X_OK):
        _start_under_reaper(daemon, pid_file)
        return
    # A file, not a pipe, for the output: the daemon's children could hold a pipe open forever.
    with tempfile.TemporaryFile(mode="w+") as output:
        try:
            done = subprocess.run(
                [daemon, "-d", "-p", pid_file],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                timeout=_ASK_SECONDS * 4,
            )
        except subprocess.TimeoutExpired:
            raise ServiceError(f"{name} did not finish starting within {_ASK_SECONDS * 4}s") from None
        if done.returncode != 0:
            output.seek(0)
            lines = [line.strip() for line in output.read().splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit status {done.returncode}"
            raise ServiceError(f"cannot start {name}: {detail}")


def _start_under_reaper(daemon: str, pid_file: str) -> None:
    """``tini -s -- DAEMON -p PID_FILE`` in a session of its own (the daemon stays in the foreground, as
    tini's child, its output appended to ``LIBVIRTD_LOG``); returns once the pid file is written, or
    says why the daemon stopped."""
    name = os.path.basename(daemon)
    try:
        os.unlink(pid_file)  # a stale one would be taken for the new daemon's
    except FileNotFoundError:
        pass
    try:
        os.makedirs(os.path.dirname(LIBVIRTD_LOG), mode=0o700, exist_ok=True)
        output = open(LIBVIRTD_LOG, "a+")
    except OSError as error:
        raise ServiceError(f"cannot start {name}: cannot open {LIBVIRTD_LOG}: {error.strerror}") from None
    with output:
        start = output.tell()
        process = subprocess.Popen([TINI, "-s", "--", daemon, "-p", pid_file], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=output, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + _ASK_SECONDS * 4
        while not os.path.exists(pid_file):
            if process.poll() is not None:
                output.seek(start)
                lines = [line.strip() for line in output.read().splitlines() if line.strip()]
                detail = lines[-1] if lines else f"exit status {process.returncode}"
                raise ServiceError(f"cannot start {name}: {detail}")
            if time.monotonic() >= deadline:
                raise ServiceError(f"{name} did not write {pid_file} within {_ASK_SECONDS * 4}s (see {LIBVIRTD_LOG})")
            time.sleep(_POLL_SECONDS)
    process.returncode = 0  # it runs on, reparented to init once this process ends: never waited for
