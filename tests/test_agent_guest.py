"""The agent in a real guest: the demo image booted under libvirt/QEMU, driven over its virtio port.

One guest serves every test here (boots are expensive under TCG). It proves what a UNIX socket
on the host cannot: the virtio port's EOF on host disconnect, waiting for the next host, and
output through the real channel.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from blahvm.guest import control
from blahvm.guest.client import AgentError, run_payload, wait_ready
from blahvm.guest.protocol import agent_socket_path
from tests.test_agent_exec import run as run_captured

pytestmark = pytest.mark.guest
pytest.importorskip("blahvm.image.demo", reason="the demo image builder is not there yet")

JOB = control.Identity(4242, 4243, (4243, 4244), root=True, user="bvmjob", group="bvmgrp", hostname="job-4711")
BOOT_TIMEOUT = 240  # seconds; TCG on two shared cores, other tests may boot guests too
RUN_TIMEOUT = 120


@pytest.fixture(scope="module")
def guest_socket(demo_image):
    """The host end of org.blahvm.agent.0 of a running demo guest, bound over its control port to
    run the job of a user the image does not know (JOB), which may ask for root."""
    libvirt = pytest.importorskip("libvirt")
    from blahvm.hypervisor.domain import (BackingFile, DiskSpec, GuestMetadata, GuestSpec, build_domain_xml,
                                          guest_uuid)
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    run_dir = tempfile.mkdtemp(prefix="blahvm-agent-guest-")
    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(run_dir, qemu.pw_uid, qemu.pw_gid)  # QEMU creates the socket and the console log
    os.chmod(run_dir, 0o750)
    overlay = os.path.join(run_dir, "disk.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", demo_image.image, overlay], check=True
    )
    name = "blahvm-test-agent-%s" % uuid.uuid4().hex[:8]
    spec = GuestSpec(
        name=name,
        uuid=guest_uuid(name),
        flavour="kvm",
        memory=demo_image.environment().memory,
        vcpus=1,
        disks=(DiskSpec(overlay, backing=BackingFile(demo_image.image)),),  # the golden stays root's
        metadata=GuestMetadata(job_id="agent-test", user="root", environment="demo", host="localhost",
                               created=int(time.time())),
        agent_sockets=(agent_socket_path(run_dir, 0),),
        control_socket=os.path.join(run_dir, "control.sock"),
        kernel=demo_image.kernel,
        initrd=demo_image.initrd,
        cmdline=demo_image.cmdline + " blahvm.hostname=agenttest",
        serial_log=os.path.join(run_dir, "console.log"),
        domain_type="qemu",
    )
    connection = libvirt.open("qemu:///system")
    domain = connection.createXML(build_domain_xml(spec), libvirt.VIR_DOMAIN_START_AUTODESTROY)
    try:
        started = time.monotonic()
        hello = wait_ready(agent_socket_path(run_dir, 0), timeout=BOOT_TIMEOUT)
        print("boot to agent hello: %.1fs" % (time.monotonic() - started))
        assert hello.hostname == "agenttest"
        control.bind(os.path.join(run_dir, "control.sock"), JOB, 60)
        assert run(agent_socket_path(run_dir, 0), ["hostname"])[:2] == (0, b"job-4711\n")  # the bind's, not the cmdline's
        yield agent_socket_path(run_dir, 0)
    finally:
        try:
            domain.destroy()
        except libvirt.libvirtError:
            pass
        connection.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def run(sock, argv, stdin_data=None, **options):
    return run_captured(sock, argv, stdin_data, ready_timeout=RUN_TIMEOUT, **options)


def test_output_is_byte_exact_through_the_virtio_port(guest_socket):
    script = "import os\nos.write(1, bytes(range(256)) * 4096)\nos.write(2, b'to stderr')\n"
    started = time.monotonic()
    code, out, err = run(guest_socket, ["python3", "-c", script])
    print("1 MiB out of the guest: %.2fs" % (time.monotonic() - started))
    assert (code, err) == (0, b"to stderr")
    assert out == bytes(range(256)) * 4096


def test_stdin_goes_in_exactly(guest_socket):
    data = os.urandom(1536 * 1024)  # beyond the stdin window
    script = "import sys\nsys.stdout.buffer.write(sys.stdin.buffer.read())\n"
    assert run(guest_socket, ["python3", "-c", script], stdin_data=data) == (0, data, b"")


def test_exit_codes_and_signals(guest_socket):
    assert run(guest_socket, ["sh", "-c", "exit 7"])[0] == 7
    assert run(guest_socket, ["sh", "-c", "kill -TERM $$"])[0] == 128 + 15


def test_runs_as_the_bound_user_and_root_only_as_allowed(guest_socket):
    assert run(guest_socket, ["sh", "-c", "id -u; id -g; id -G"]) == (0, b"4242\n4243\n4243 4244\n", b"")
    # the bind made the user and group known by name, as cloud images' users are
    assert run(guest_socket, ["sh", "-c", "id -un; id -gn"]) == (0, b"bvmjob\nbvmgrp\n", b"")
    assert run(guest_socket, ["id", "-u"], uid=0) == (0, b"0\n", b"")
    with pytest.raises(AgentError, match="refusing to run as uid 1000"):
        run(guest_socket, ["id"], uid=1000)


def test_refresh_sets_the_clock_and_reseeds(guest_socket):
    control_socket = os.path.join(os.path.dirname(guest_socket), "control.sock")
    # a refresh is root's: the job's own socket cannot ask for it
    with pytest.raises(AgentError, match="not served"):
        from blahvm.guest.client import open_session
        from blahvm.guest.protocol import encode_control

        connection, hello = open_session(guest_socket, 60)
        try:
            connection.send(encode_control({"type": "refresh", "session": hello.session, "time": 1.0,
                                            "entropy": "00" * 64}))
            connection.next_control(time.monotonic() + 60, "an answer")
        finally:
            connection.close()
    assert run(guest_socket, ["date", "-s", "@1000000000"], uid=0)[0] == 0  # a clock as stale as a saved state's
    control.refresh(control_socket, 60)
    code, out, _ = run(guest_socket, ["date", "+%s"])
    assert code == 0 and abs(int(out) - time.time()) < 5


def test_a_killed_client_kills_the_payload_and_the_port_serves_again(guest_socket):
    client = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom blahvm.guest.client import run_payload\n"
         "sys.exit(run_payload(sys.argv[1], sys.argv[2:], ready_timeout=%d))\n" % RUN_TIMEOUT,
         guest_socket, "sh", "-c", "sleep 1000 & echo $!; wait"],
        stdout=subprocess.PIPE,
    )
    try:
        sleeper = int(client.stdout.readline())
    finally:
        client.kill()
        client.wait()
    # a process that is gone, or a zombie nobody reaped yet, is no longer running
    check = (
        "import sys, time\n"
        "for _ in range(600):\n"
        "    try:\n"
        "        state = open('/proc/%d/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "    except OSError:\n"
        "        state = 'gone'\n"
        "    if state in ('gone', 'Z'):\n"
        "        sys.exit(0)\n"
        "    time.sleep(0.1)\n"
        "sys.exit(1)\n" % sleeper
    )
    assert run(guest_socket, ["python3", "-c", check])[0] == 0


def test_round_trip_of_a_trivial_command(guest_socket):
    timings = []
    for _ in range(5):
        started = time.monotonic()
        assert run(guest_socket, ["/bin/true"])[0] == 0
        timings.append(time.monotonic() - started)
    print("round trip of /bin/true in the guest: best %.0f ms, median %.0f ms"
          % (min(timings) * 1000, sorted(timings)[2] * 1000))


def test_stdout_throughput_out_of_the_guest(guest_socket):
    size = 64 * 1024 * 1024
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        started = time.monotonic()
        # dd, not head: busybox's head alone manages ~25 MB/s under TCG
        argv = ["dd", "if=/dev/zero", "bs=65536", "count=%d" % (size // 65536)]
        code = run_payload(guest_socket, argv, stdout=devnull, stderr=devnull, ready_timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        os.close(devnull)
    assert code == 0
    print("stdout out of the guest: %.0f MB/s" % (size / elapsed / 1e6))


def test_back_to_back_launches_are_each_answered_at_once(guest_socket, monkeypatch):
    """Every open gets its hello with no resend, also while the guest's CPU is busy: that is when
    the guest reads the next host's open before the port stops showing the last host gone."""
    from blahvm.guest import client

    monkeypatch.setattr(client, "OPEN_RESEND_FIRST", 3600.0)
    hog = "setsid sh -c 'echo $$ > /tmp/hog.pid; while :; do :; done' </dev/null >/dev/null 2>&1 &"
    assert run(guest_socket, ["sh", "-c", hog])[0] == 0  # outside the payload's group: it stays
    try:
        for index in range(20):
            started = time.monotonic()
            code, _, _ = run_captured(guest_socket, ["/bin/true"], None, ready_timeout=10)
            assert code == 0, "launch %d" % index
            assert time.monotonic() - started < 5, "launch %d waited for its hello" % index
    finally:
        run(guest_socket, ["sh", "-c", "kill $(cat /tmp/hog.pid)"])
