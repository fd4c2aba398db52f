"""blahvm.services against the real libvirt daemons of this host, and fresh ones in a private namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from blahvm import services

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting libvirt daemons needs root")


def test_running_processes_finds_this_interpreter():
    with open("/proc/self/comm", encoding="utf-8") as comm:
        name = comm.read().strip()
    assert os.getpid() in services.running_processes(name)
    assert services.running_processes("no-such-daemon-name") == []


@needs_root
def test_ensure_libvirt_leaves_running_daemons_alone():
    services.ensure_libvirt("qemu:///system", timeout=90)
    before = {name: services.running_processes(name) for name in ("virtlogd", "libvirtd")}
    assert before["libvirtd"] and before["virtlogd"]
    services.ensure_libvirt("qemu:///system", timeout=90)
    after = {name: services.running_processes(name) for name in ("virtlogd", "libvirtd")}
    assert after == before


@needs_root
def test_a_uri_that_never_answers_is_a_clear_error():
    uri = "qemu+unix:///system?socket=/nonexistent/blahvm-test-sock"
    with pytest.raises(services.ServiceError) as raised:
        services.ensure_libvirt(uri, timeout=1)
    message = str(raised.value)
    assert uri in message and "does not answer" in message
    assert "\n" not in message


# Fresh daemons in a private mount, pid and network namespace: /run is an empty tmpfs there, so
# nothing answers until ensure_libvirt starts virtlogd and libvirtd, and both die with the namespace.
_IN_NAMESPACE = textwrap.dedent(
    """
    import json, os, sys
    from blahvm import services
    before = {n: services.running_processes(n) for n in ("virtlogd", "libvirtd")}
    services.ensure_libvirt("qemu:///system", timeout=90, pid_dir="/run")
    started = {n: services.running_processes(n) for n in ("virtlogd", "libvirtd")}
    services.ensure_libvirt("qemu:///system", timeout=90, pid_dir="/run")
    again = {n: services.running_processes(n) for n in ("virtlogd", "libvirtd")}
    pid_files = sorted(f for f in os.listdir("/run") if f.endswith(".pid"))
    def parent_of(pid):
        with open(f"/proc/{pid}/stat") as stat:
            ppid = stat.read().rsplit(")", 1)[1].split()[1]
        with open(f"/proc/{ppid}/comm") as comm:
            return comm.read().strip()
    parents = {n: parent_of(p[0]) for n, p in started.items()}
    print(json.dumps({"before": before, "started": started, "again": again, "pid_files": pid_files,
                      "parents": parents}))
    """
)


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_ensure_libvirt_starts_missing_daemons_in_order():
    import json

    script = f"mount -t tmpfs tmpfs /run && mkdir /run/lock && exec {sys.executable} -c \"$0\""
    done = subprocess.run(
        ["unshare", "--mount", "--pid", "--net", "--fork", "--mount-proc", "/bin/sh", "-c", script, _IN_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == {"virtlogd": [], "libvirtd": []}
    assert len(seen["started"]["virtlogd"]) == 1 and len(seen["started"]["libvirtd"]) == 1
    # virtlogd was started first, so it got the lower pid in the fresh pid namespace
    assert seen["started"]["virtlogd"][0] < seen["started"]["libvirtd"][0]
    assert seen["again"] == seen["started"]
    assert seen["pid_files"] == ["libvirtd.pid", "virtlogd.pid"]
    # libvirtd under tini, its child subreaper: the guests' QEMU processes are reaped as soon as they exit
    assert seen["parents"]["libvirtd"] == ("tini" if os.access(services.TINI, os.X_OK) else seen["parents"]["virtlogd"])
