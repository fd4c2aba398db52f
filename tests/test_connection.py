"""Bounded libvirt calls against real peers (a stuck UNIX socket, test:///default, qemu:///system),
and the guest lifecycle built on them."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from blahvm.hypervisor.connection import Connection, bounded, open_connection
from blahvm.hypervisor.domain import DiskSpec, GuestMetadata, GuestSpec, build_domain_xml, guest_uuid
from blahvm.hypervisor.errors import (
    DefinitionRejected,
    HypervisorTimeout,
    HypervisorUnavailable,
    LibvirtCallFailed,
    NotFound,
    SpecError,
)
from blahvm.hypervisor.guests import (
    GuestInfo,
    define_and_start,
    destroy_and_undefine,
    domain_state,
    list_blahvm_guests,
    wait_until_stopped,
)
from blahvm.hypervisor.kvm import hardware_kvm_usable, resolve_domain_type
from blahvm.hypervisor.naming import guest_name
from blahvm.model import Outcome
from blahvm.quantities import Size
from tests.fixtures_image import demo_image, demo_image_dir  # noqa: F401  (pytest fixtures)


@pytest.fixture
def stuck_socket():
    """A UNIX socket that accepts connections and never answers: a wedged libvirtd."""
    directory = tempfile.mkdtemp(prefix="blahvm-stuck-", dir="/tmp")
    path = os.path.join(directory, "libvirt-sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    for peer in held:
        peer.close()
    server.close()
    os.unlink(path)
    os.rmdir(directory)


def test_connect_to_a_wedged_libvirtd_times_out_cleanly(stuck_socket):
    uri = f"qemu+unix:///system?socket={stuck_socket}"
    started = time.monotonic()
    with pytest.raises(HypervisorTimeout, match="did not answer 'connect' within 2s") as caught:
        open_connection(uri, timeout=2)
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 15  # bounded: the hook gets its answer, well inside 30 s
    assert isinstance(caught.value, HypervisorUnavailable)
    assert caught.value.outcome is Outcome.RETRY_ELSEWHERE


def test_a_hook_process_exits_even_with_a_stuck_call_behind(stuck_socket):
    # The abandoned thread is a daemon: the interpreter still exits promptly.
    code = (
        "from blahvm.hypervisor.connection import open_connection\n"
        "from blahvm.hypervisor.errors import HypervisorTimeout\n"
        "try:\n"
        f"    open_connection('qemu+unix:///system?socket={stuck_socket}', timeout=1)\n"
        "except HypervisorTimeout as e:\n"
        "    raise SystemExit(7)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, text=True)
    assert result.returncode == 7
    assert result.stdout == "" and result.stderr == ""  # no libvirt chatter on the hook's streams


def test_call_is_bounded_while_the_peer_is_silent(stuck_socket):
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(stuck_socket)
    try:
        with pytest.raises(HypervisorTimeout, match="'read reply'"):
            bounded("read reply", "unix:" + stuck_socket, 0.5, peer.recv, 1)
    finally:
        peer.close()


def test_unreachable_libvirt_is_unavailable():
    with pytest.raises(HypervisorUnavailable, match="Failed to connect socket") as caught:
        open_connection("qemu+unix:///system?socket=/nonexistent/blahvm-sock", timeout=5)
    assert "\n" not in str(caught.value)
    with pytest.raises(HypervisorUnavailable, match="no connection driver"):
        open_connection("nosuchdriver:///system", timeout=5)


def test_libvirt_errors_are_mapped_on_the_test_driver():
    with open_connection("test:///default", timeout=10) as conn:
        with pytest.raises(NotFound, match="lookup blahvm-none") as caught:
            conn.call("lookup blahvm-none", conn.raw.lookupByName, "blahvm-none")
        assert isinstance(caught.value, LibvirtCallFailed)
        with pytest.raises(DefinitionRejected) as rejected:
            conn.call("define", conn.raw.defineXML, "<domain type='test'><name>x</name></domain>")
        assert rejected.value.outcome is Outcome.FAIL_JOB
        assert conn.call("list", conn.raw.listAllDomains)  # the test driver has one guest
    with pytest.raises(HypervisorUnavailable, match="closed"):
        conn.call("list", lambda: None)


def test_non_libvirt_errors_pass_through():
    def broken():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        bounded("broken", "test:///default", 5, broken)


@pytest.mark.skipif(not os.path.exists("/run/libvirt/libvirt-sock"), reason="no libvirtd running here")
def test_real_libvirtd_answers():
    with open_connection("qemu:///system", timeout=20) as conn:
        assert isinstance(conn, Connection)
        assert conn.call("version", conn.raw.getLibVersion) >= 9000000


def test_domain_type_rule(tmp_path):
    assert resolve_domain_type("qemu", root=str(tmp_path)) == "qemu"
    assert resolve_domain_type("kvm", root=str(tmp_path)) == "kvm"  # the config can force it
    assert resolve_domain_type("auto", root=str(tmp_path)) == "qemu"  # no /dev/kvm
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    (tmp_path / "sys/module/kvm").mkdir(parents=True)
    (tmp_path / "sys/module/kvm_pvm").mkdir()
    assert resolve_domain_type("auto", root=str(tmp_path)) == "qemu"  # paravirtual KVM only
    (tmp_path / "sys/module/kvm_amd").mkdir()
    assert resolve_domain_type("auto", root=str(tmp_path)) == "kvm"
    with pytest.raises(SpecError, match="domain_type 'xen'"):
        resolve_domain_type("xen")


@pytest.mark.skipif(
    not os.path.isdir("/sys/module/kvm_pvm"), reason="only meaningful on a host with a paravirtual KVM"
)
def test_this_hosts_paravirtual_kvm_is_not_used():
    assert os.path.exists("/dev/kvm")
    assert not hardware_kvm_usable()
    assert resolve_domain_type("auto") == "qemu"


# -- guests: define, start, list, wait, destroy over a bounded connection -------------------------

QEMU_IMG = shutil.which("qemu-img")


def guest_xml(job_id="77.server", directory="/var/lib/blahvm/clones", **changes):
    name = guest_name(job_id)
    meta = GuestMetadata(job_id=job_id, user="cms001", environment="slc4", host="node1", created=1, vo="cms")
    values = dict(
        name=name,
        uuid=guest_uuid(name),
        flavour="kvm",
        domain_type="qemu",
        memory=Size.parse("64MiB"),
        vcpus=1,
        disks=(DiskSpec(f"{directory}/{name}.qcow2"),),
        metadata=meta,
    )
    values.update(changes)
    return name, meta, build_domain_xml(GuestSpec(**values))


@pytest.fixture
def test_conn():
    with open_connection("test:///default", timeout=10) as conn:
        yield conn


def test_guest_lifecycle_on_the_test_driver(test_conn):
    name, meta, xml = guest_xml()
    assert define_and_start(test_conn, xml) == name
    assert define_and_start(test_conn, xml) == name  # re-run: still the one running guest
    assert domain_state(test_conn, name) == "running"
    # The test driver's own domain "test" carries no blahvm metadata and is not listed.
    assert list_blahvm_guests(test_conn) == (GuestInfo(name, meta, "running"),)
    assert wait_until_stopped(test_conn, name, timeout=0.5, poll=0.1) is False
    test_conn.raw.lookupByName(name).shutdown()
    assert wait_until_stopped(test_conn, name, timeout=5) is True
    assert list_blahvm_guests(test_conn) == (GuestInfo(name, meta, "shutoff"),)
    assert destroy_and_undefine(test_conn, name) is True
    assert destroy_and_undefine(test_conn, name) is False  # gone is fine
    assert domain_state(test_conn, name) is None
    assert wait_until_stopped(test_conn, name, timeout=1) is True
    assert list_blahvm_guests(test_conn) == ()


def test_guests_with_damaged_metadata_are_not_listed(test_conn):
    name, _meta, xml = guest_xml()
    damaged = xml.replace("<blahvm:created>1970-01-01T00:00:01Z</blahvm:created>", "")
    assert damaged != xml
    define_and_start(test_conn, damaged)
    assert domain_state(test_conn, name) == "running"
    assert list_blahvm_guests(test_conn) == ()
    destroy_and_undefine(test_conn, name)


def test_refused_definitions(test_conn):
    name, _meta, xml = guest_xml()
    with pytest.raises(DefinitionRejected):
        define_and_start(test_conn, xml.replace('<memory unit="KiB">65536</memory>', "<memory>lots</memory>"))
    with pytest.raises(SpecError, match="not a safe guest or volume name"):
        define_and_start(test_conn, xml.replace(f"<name>{name}</name>", "<name>../x</name>"))
    with pytest.raises(SpecError, match="does not parse"):
        define_and_start(test_conn, "<domain")
    assert domain_state(test_conn, name) is None


@pytest.fixture
def world_readable_dir():
    """QEMU runs as its own user: its files must be reachable outside root's private tmp."""
    directory = tempfile.mkdtemp(prefix="blahvm-guest-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(
    not os.path.exists("/run/libvirt/libvirt-sock") or QEMU_IMG is None,
    reason="needs a running libvirtd (qemu:///system) and qemu-img",
)
def test_real_qemu_accepts_the_guest_and_cleans_up(world_readable_dir):
    """One real QEMU process (firmware only, no OS): XML, serial log, agent socket, lifecycle."""
    job_id = f"real-{os.getpid()}"
    name, meta, _ = guest_xml(job_id, world_readable_dir)
    disk = f"{world_readable_dir}/{name}.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    log, sock = f"{world_readable_dir}/console.log", f"{world_readable_dir}/agent.0.sock"
    _, _, xml = guest_xml(job_id, world_readable_dir, serial_log=log, agent_sockets=(sock,))
    with open_connection("qemu:///system", timeout=60) as conn:
        try:
            started = time.monotonic()
            define_and_start(conn, xml)
            print(f"define+start: {time.monotonic() - started:.3f}s")
            assert domain_state(conn, name) == "running"
            assert GuestInfo(name, meta, "running") in list_blahvm_guests(conn)
            assert os.path.exists(log)
            assert stat_is_socket(sock)  # QEMU listens on the agent channel
            started = time.monotonic()
            assert destroy_and_undefine(conn, name) is True
            print(f"destroy+undefine: {time.monotonic() - started:.3f}s")
            assert domain_state(conn, name) is None
        finally:
            destroy_and_undefine(conn, name)


@pytest.mark.skipif(not os.path.exists("/run/libvirt/libvirt-sock"), reason="needs a running libvirtd")
def test_real_start_failure_leaves_no_definition(world_readable_dir):
    name, _meta, xml = guest_xml(f"missing-disk-{os.getpid()}", world_readable_dir)  # disk never made
    with open_connection("qemu:///system", timeout=60) as conn:
        try:
            with pytest.raises(LibvirtCallFailed, match=f"start {name} on qemu:///system failed"):
                define_and_start(conn, xml)
            assert domain_state(conn, name) is None
        finally:
            destroy_and_undefine(conn, name)


def stat_is_socket(path):
    return os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode)


@pytest.mark.guest
@pytest.mark.skipif(not os.path.exists("/run/libvirt/libvirt-sock"), reason="needs a running libvirtd")
def test_real_guest_power_off_ends_the_domain(world_readable_dir, demo_image):
    """The demo kernel on a blank disk fails to mount its root and powers off: with ACPI and
    on_poweroff=destroy the domain then stops by itself, and the serial log holds its last words."""
    job_id = f"poweroff-{os.getpid()}"
    name = guest_name(job_id)
    disk = f"{world_readable_dir}/{name}.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    log = f"{world_readable_dir}/console.log"
    _, _, xml = guest_xml(
        job_id,
        world_readable_dir,
        memory=Size.parse("256MiB"),
        kernel=demo_image.kernel,
        initrd=demo_image.initrd,
        cmdline="console=ttyS0 panic=-1",
        serial_log=log,
    )
    with open_connection("qemu:///system", timeout=60) as conn:
        try:
            define_and_start(conn, xml)
            assert wait_until_stopped(conn, name, timeout=180) is True
            with open(log, errors="replace") as console:
                output = console.read()
            assert "Linux version" in output
            assert "blahvm-guest:" in output  # the guest's own message, then poweroff
        finally:
            destroy_and_undefine(conn, name)
