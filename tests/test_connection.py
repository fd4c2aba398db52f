"""Bounded libvirt calls against real peers: a stuck UNIX socket, test:///default, qemu:///system."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from blahvm.hypervisor.connection import Connection, bounded, open_connection
from blahvm.hypervisor.errors import (
    DefinitionRejected,
    HypervisorTimeout,
    HypervisorUnavailable,
    LibvirtCallFailed,
    NotFound,
)
from blahvm.hypervisor.kvm import hardware_kvm_usable, resolve_domain_type
from blahvm.hypervisor.errors import SpecError
from blahvm.model import Outcome


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
