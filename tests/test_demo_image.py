"""The demo golden image: its pieces (cpio, kernel modules, apt parsing, init scripts), the cached
build, what is inside the root disk, and one real boot under libvirt/QEMU.

The ``demo_image`` session fixture comes from tests/fixtures_image.py through tests/conftest.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import pwd
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.cli import image as image_cli
from blahvm.image import cpio, debs, demo, guest_init, kmod
from blahvm.image.errors import ImageBuildError
from blahvm.hypervisor.spec import AGENT_PORT
from blahvm.model import Environment

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


# -- cpio ------------------------------------------------------------------------------------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=40).filter(
    lambda name: name not in (".", "..")
)


@settings(max_examples=25, deadline=None)
@given(files=st.dictionaries(_names, st.binary(max_size=3000), min_size=1, max_size=6))
def test_cpio_archive_unpacks_with_a_real_cpio(files):
    entries = [cpio.Entry.directory("d")]
    entries += [cpio.Entry.file(f"d/{name}", data, 0o640) for name, data in files.items()]
    entries.append(cpio.Entry.symlink("link", "d"))
    with tempfile.TemporaryDirectory() as where:
        subprocess.run(
            [BUSYBOX, "cpio", "-i", "-d"], input=cpio.newc_archive(entries), cwd=where, check=True, capture_output=True
        )
        for name, data in files.items():
            path = os.path.join(where, "d", name)
            with open(path, "rb") as stream:
                assert stream.read() == data
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert os.readlink(os.path.join(where, "link")) == "d"


def test_cpio_device_node_and_trailer():
    archive = cpio.newc_archive([cpio.Entry.char_device("console", 5, 1)])
    listing = subprocess.run([BUSYBOX, "cpio", "-t", "-v"], input=archive, capture_output=True, check=True).stdout
    assert listing.decode().split()[0].startswith("c")
    assert archive.rstrip(b"\0").endswith(b"TRAILER!!!")
    assert len(archive) % 4 == 0


@pytest.mark.parametrize("path", ["", "/init", "a\0b"])
def test_cpio_rejects_bad_member_paths(path):
    with pytest.raises(ValueError, match="relative"):
        cpio.newc_archive([cpio.Entry.file(path, b"")])


# -- kernel modules ---------------------------------------------------------------------------------


@st.composite
def _module_graphs(draw):
    """A random acyclic dependency map: a module may only depend on modules listed before it."""
    count = draw(st.integers(1, 12))
    names = [f"m{i}" for i in range(count)]
    depends = {name: tuple(draw(st.sets(st.sampled_from(names[:i]))) if i else ()) for i, name in enumerate(names)}
    wanted = draw(st.lists(st.sampled_from(names), min_size=1, max_size=5))
    loaded = draw(st.sets(st.sampled_from(names), max_size=3))
    return depends, wanted, loaded


def _closure(depends, names, stop=frozenset()):
    seen, pending = set(), list(names)
    while pending:
        name = pending.pop()
        if name not in seen and name not in stop:
            seen.add(name)
            pending.extend(depends[name])
    return seen


@settings(max_examples=200)
@given(_module_graphs())
def test_load_order_puts_dependencies_first_and_skips_loaded(graph):
    depends, wanted, loaded = graph
    order = kmod.load_order(wanted, depends, loaded)
    assert len(order) == len(set(order))
    assert not set(order) & loaded
    position = {name: index for index, name in enumerate(order)}
    for name in order:
        for dep in depends[name]:
            assert dep in loaded or position[dep] < position[name]
    # exactly what is needed: the wanted and their dependencies, not looking under a loaded
    # module (its own dependencies are loaded already)
    assert set(order) == _closure(depends, wanted, stop=loaded)


def test_load_order_refuses_a_cycle_and_an_unknown_module():
    with pytest.raises(kmod.ModuleError, match="depends on itself"):
        kmod.load_order(["a"], {"a": ("b",), "b": ("a",)})
    with pytest.raises(kmod.ModuleError, match="no known dependencies"):
        kmod.load_order(["a"], {"a": ("zz",)})


@settings(max_examples=200)
@given(st.binary(max_size=512))
def test_modinfo_of_garbage_is_a_module_error(data):
    with pytest.raises(kmod.ModuleError):
        kmod.modinfo(b"\x7fELF\x02\x01" + data)


def test_module_names_normalise_dashes():
    assert kmod.module_name("/x/virtio-pci.ko") == kmod.module_name("virtio_pci.ko") == "virtio_pci"


# -- apt output --------------------------------------------------------------------------------------

_APT_SHOW = """Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Depends: libc6
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
Size: 928188
SHA256: 3D3FDBE91D4660C873E14B092C213FE81C1DA6362DAA236EB25D0171EB108744
Description: Standalone rescue shell
 with tons of builtin utilities

Package: zlib1g
Version: 1:1.2.13.dfsg-1
Filename: pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb
Size: 86684
SHA256: d7dd1d1411fedf27f5e27650a6eff20ef294077b568f4c8c5e51466dc7c08ce4
"""


def test_parse_apt_show():
    first, second = debs.parse_apt_show(_APT_SHOW)
    assert first == debs.Package(
        name="busybox-static",
        version="1:1.35.0-4+deb12u1+b1",
        filename="busybox-static_1.35.0-4+deb12u1+b1_amd64.deb",
        sha256="3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
        size=928188,
    )
    assert second.name == "zlib1g" and second.size == 86684


def test_parse_apt_show_without_a_checksum_is_a_clear_error():
    with pytest.raises(ImageBuildError, match="SHA256"):
        debs.parse_apt_show("Package: x\nVersion: 1\nFilename: x.deb\nSize: 1\n")


def test_parse_first_dependency_of_a_metapackage():
    text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert debs.parse_first_dependency(text) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(ImageBuildError):
        debs.parse_first_dependency("linux-image-cloud-amd64\n")


# -- init scripts ------------------------------------------------------------------------------------


def test_init_scripts_take_only_plain_module_names():
    assert "insmod" in guest_init.initramfs_init(["virtio_ring", "virtio"])
    for bad in ("a;reboot", "$(x)", "a b", ""):
        with pytest.raises(ValueError):
            guest_init.initramfs_init([bad])
        with pytest.raises(ValueError):
            guest_init.root_init([bad])


@pytest.mark.parametrize(
    "cmdline, expected",
    [
        ("console=ttyS0 blahvm.hostname=job-42 quiet", "job-42"),
        ("console=ttyS0 quiet", "localhost"),
        ("blahvm.hostname=-Ffile", "localhost"),  # never an option of hostname(1)
        ("blahvm.hostname=$(reboot) *", "localhost"),
    ],
)
def test_root_init_reads_the_hostname_from_the_command_line(cmdline, expected):
    """Run the script's hostname part with a stand-in ``hostname`` that records its argument."""
    script = guest_init.root_init([])
    start = script.index("hostname localhost")
    end = script.index('echo "' + guest_init.READY_LINE)
    part = script[start:end].replace("$(cat /proc/cmdline)", "$CMDLINE")
    recorder = 'hostname() { NAME="$1"; }\nip() { :; }\n'
    done = subprocess.run(
        [BUSYBOX, "sh", "-c", recorder + part + 'echo "$NAME"'],
        env={"CMDLINE": cmdline, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == expected


# -- the built image ---------------------------------------------------------------------------------


def _qcow2_backing_offset(path):
    with open(path, "rb") as stream:
        header = stream.read(16)
    assert header[:4] == b"QFI\xfb", "not a qcow2 image"
    return struct.unpack(">Q", header[8:16])[0]


def test_build_is_cached_and_reused(demo_image):
    golden = os.stat(demo_image.image)
    lines = []
    again = demo.build_demo_image(os.path.dirname(demo_image.directory), progress=lines.append)
    assert again.reused
    assert again == demo_image and again.sha256 == demo_image.sha256
    assert any("reusing" in line for line in lines)
    after = os.stat(demo_image.image)
    assert (after.st_ino, after.st_mtime_ns) == (golden.st_ino, golden.st_mtime_ns)


def test_golden_is_standalone_read_only_and_matches_its_checksum(demo_image):
    assert _qcow2_backing_offset(demo_image.image) == 0
    assert debs.sha256_of(demo_image.image) == demo_image.sha256
    for path in (demo_image.image, demo_image.kernel, demo_image.initrd):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o222 == 0, f"{path} is writable"
        assert mode & 0o004, f"{path} is not readable by QEMU's user"
    assert not [name for name in os.listdir(os.path.dirname(demo_image.directory)) if name.startswith(".build-")]


def test_golden_passes_the_hypervisor_image_check(demo_image, tmp_path):
    from blahvm.hypervisor.images import verify_image

    info = verify_image("demo", demo_image.image, demo_image.sha256, str(tmp_path))
    assert info.format == "qcow2" and info.virtual_size >= demo.MIN_DISK


def test_image_carries_the_current_agent(demo_image):
    agent = demo._read_agent()
    expected = hashlib.sha256(agent).hexdigest() if agent is not None else None
    assert demo_image.agent_sha256 == expected
    assert demo_image.key == demo.image_key(agent)


def test_key_changes_with_the_agent():
    keys = {demo.image_key(None), demo.image_key(b"print(1)\n"), demo.image_key(b"print(2)\n")}
    assert len(keys) == 3


def test_an_incomplete_image_directory_is_not_an_image(tmp_path):
    (tmp_path / "golden.qcow2").write_bytes(b"QFI\xfb")
    (tmp_path / "vmlinuz").write_bytes(b"")
    (tmp_path / "initrd.img").write_bytes(b"")
    assert demo._load(str(tmp_path)) is None  # no manifest: the build did not finish


def _as_nobody(function):
    """``function()``'s result (a string), computed in a child process running as nobody."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write_end, function().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        result = stream.read().decode()
    assert os.waitpid(pid, 0)[1] == 0, "the child running as nobody failed"
    return result


def test_any_user_reuses_the_cache_but_only_root_builds(demo_image, tmp_path):
    assert _as_nobody(lambda: demo.build_demo_image(os.path.dirname(demo_image.directory)).sha256) == demo_image.sha256

    def build_elsewhere():
        try:
            demo.build_demo_image(str(tmp_path / "empty"))
        except ImageBuildError as error:
            return str(error)
        return "built"

    assert _as_nobody(build_elsewhere) == f"no demo image in {tmp_path / 'empty'} yet, and building one needs root"


def test_environment_entry(demo_image):
    entry = yaml.safe_load(demo_image.environment_yaml("demo-x"))
    assert entry == {
        "demo-x": {
            "image": demo_image.image,
            "sha256": demo_image.sha256,
            "flavour": "kvm",
            "memory": "256MiB",
            "vcpus": 1,
            "kernel": demo_image.kernel,
            "initrd": demo_image.initrd,
            "cmdline": "console=ttyS0 panic=-1 quiet",
        }
    }
    environment = demo_image.environment("demo-x")
    assert isinstance(environment, Environment)
    assert (environment.image, environment.sha256, environment.flavour) == (
        demo_image.image,
        demo_image.sha256,
        "kvm",
    )


def _read_from_golden(golden, path, into):
    """A file of the golden's ext4 root, read with debugfs from a raw copy (no mount needed)."""
    raw = os.path.join(into, "root.raw")
    if not os.path.exists(raw):
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", golden, raw], check=True)
    out = os.path.join(into, "out")
    subprocess.run(["debugfs", "-R", f"dump {path} {out}", raw], check=True, capture_output=True)
    with open(out, "rb") as stream:
        return stream.read()


def test_root_disk_holds_init_python_and_agent(demo_image, tmp_path):
    init = _read_from_golden(demo_image.image, "/sbin/init", str(tmp_path)).decode()
    assert guest_init.READY_LINE in init and "poweroff -f" in init
    assert f"--port '{guest_init.AGENT_PORTS}'" in init
    assert _read_from_golden(demo_image.image, "/usr/bin/python3.11", str(tmp_path)).startswith(b"\x7fELF")
    agent = demo._read_agent()
    if agent is not None:
        assert _read_from_golden(demo_image.image, guest_init.AGENT_PATH, str(tmp_path)) == agent


def test_initramfs_modules_come_in_dependency_order(demo_image, tmp_path):
    with open(demo_image.initrd, "rb") as stream:
        archive = gzip.decompress(stream.read())
    subprocess.run([BUSYBOX, "cpio", "-i", "-d"], input=archive, cwd=tmp_path, check=True, capture_output=True)
    init = (tmp_path / "init").read_text()
    order = init.split("for module in ", 1)[1].split(";", 1)[0].split()
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_blk")
    for name in order:
        info = kmod.modinfo((tmp_path / "lib" / "modules" / f"{name}.ko").read_bytes())
        assert info["name"] == name
        for dep in filter(None, info.get("depends", "").split(",")):
            assert order.index(dep) < order.index(name)


def _seeded_dest(tmp_path, demo_image):
    """A fresh image directory whose package cache is copied from the built image's (no download)."""
    dest = tmp_path / "images"
    shutil.copytree(os.path.join(os.path.dirname(demo_image.directory), "debs"), dest / "debs")
    return str(dest)


_BUILD = "import sys; from blahvm.image import build_demo_image; build_demo_image(sys.argv[1], progress=print)"


def _start_build(dest):
    return subprocess.Popen(
        [sys.executable, "-u", "-c", _BUILD, dest], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_build_killed_midway_leaves_no_image_and_the_next_build_cleans_up(demo_image, tmp_path):
    dest = _seeded_dest(tmp_path, demo_image)
    build = _start_build(dest)
    for line in build.stdout:
        if "ext4 root disk" in line:  # the scratch tree is complete, the image is not
            build.kill()
            break
    build.wait(timeout=60)
    assert build.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(dest, demo_image.key))
    assert [name for name in os.listdir(dest) if name.startswith(".build-")]
    image = demo.build_demo_image(dest)
    assert not image.reused and image.key == demo_image.key
    assert not [name for name in os.listdir(dest) if name.startswith(".build-")]


def test_concurrent_builds_make_one_image(demo_image, tmp_path):
    dest = _seeded_dest(tmp_path, demo_image)
    builds = [_start_build(dest) for _ in range(2)]
    outputs = [build.communicate(timeout=600)[0] for build in builds]
    assert [build.returncode for build in builds] == [0, 0], outputs
    assert sum("demo image: built" in output for output in outputs) == 1
    assert sum("reusing" in output for output in outputs) == 1
    assert sorted(name for name in os.listdir(dest) if not name.startswith(".")) == sorted(["debs", demo_image.key])


# -- the command line ----------------------------------------------------------------------------------


def test_cli_build_demo_prints_the_environment_entry_last(demo_image, capsys):
    parser = argparse.ArgumentParser(prog="blahvm")
    image_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["image", "build-demo", "--dest", os.path.dirname(demo_image.directory)])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    assert "reusing" in captured.err
    entry_lines = demo_image.environment_yaml().splitlines()
    assert captured.out.splitlines()[-len(entry_lines) :] == entry_lines


def test_cli_build_demo_failure_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    parser = argparse.ArgumentParser(prog="blahvm")
    image_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["image", "build-demo", "--dest", str(blocker / "sub")])
    assert args.run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("blahvm image build-demo: cannot create the image directory")


# -- a real boot -----------------------------------------------------------------------------------------

BOOT_TIMEOUT = 240  # seconds; TCG on two shared cores, and other tests may be booting guests too


def _domain_xml(name, image, overlay, console, socket_path, hostname):
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "256"
    ET.SubElement(domain, "vcpu").text = "1"
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = image.kernel
    ET.SubElement(os_, "initrd").text = image.initrd
    ET.SubElement(os_, "cmdline").text = f"{image.cmdline} {guest_init.HOSTNAME_ARGUMENT}={hostname}"
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")  # or poweroff never stops the guest
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=overlay)
    store = ET.SubElement(disk, "backingStore", type="file")  # as prepare gives it: the golden stays root's
    ET.SubElement(store, "format", type="qcow2")
    ET.SubElement(ET.SubElement(store, "source", file=image.image), "seclabel", model="dac", relabel="no")
    ET.SubElement(store, "backingStore")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console)
    ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind", path=socket_path)
    ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT.format(0))
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


@contextlib.contextmanager
def _guest_directory():
    """A private directory QEMU (libvirt-qemu) can write its socket in; removed afterwards."""
    where = tempfile.mkdtemp(prefix="blahvm-demo-boot-")
    try:
        qemu = pwd.getpwnam("libvirt-qemu")
        os.chown(where, qemu.pw_uid, qemu.pw_gid)
        os.chmod(where, 0o750)
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _wait_for_line(path, line, domain, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "r", errors="replace") as stream:
                text = stream.read()
        except FileNotFoundError:
            text = ""
        if line in text:
            return text
        if not domain.isActive():
            pytest.fail(f"the guest stopped before printing {line!r}; console:\n{text}")
        time.sleep(0.2)
    pytest.fail(f"no {line!r} on the console within {timeout}s")


@pytest.mark.guest
def test_demo_guest_boots_to_init_and_agent_hello(demo_image):
    libvirt = pytest.importorskip("libvirt")
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    name = f"blahvm-test-demo-{uuid.uuid4().hex[:8]}"
    hostname = "demo-boot-test"
    with _guest_directory() as where:
        overlay = os.path.join(where, "disk.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", demo_image.image, overlay], check=True
        )
        console = os.path.join(where, "console.log")
        socket_path = os.path.join(where, "agent.sock")
        connection = libvirt.open("qemu:///system")
        domain = None
        try:
            started = time.monotonic()
            domain = connection.createXML(
                _domain_xml(name, demo_image, overlay, console, socket_path, hostname),
                libvirt.VIR_DOMAIN_START_AUTODESTROY,
            )
            text = _wait_for_line(console, guest_init.READY_LINE, domain, BOOT_TIMEOUT)
            print(f"boot to {guest_init.READY_LINE!r}: {time.monotonic() - started:.1f}s")
            assert "blahvm-guest: cannot" not in text and "no root disk" not in text
            if demo_image.agent_sha256 is not None:
                from blahvm.guest.client import wait_ready

                hello = wait_ready(socket_path, timeout=BOOT_TIMEOUT)
                print(f"boot to agent hello: {time.monotonic() - started:.1f}s")
                assert hello.port == AGENT_PORT.format(0)
                assert hello.hostname == hostname
        finally:
            if domain is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()
            connection.close()
    # the golden is never written through an overlay
    assert debs.sha256_of(demo_image.image) == demo_image.sha256
