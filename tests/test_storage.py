"""Clones through libvirt's storage API: test:///default (fast), and real qemu:///system pools."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest

from blahvm.hypervisor.connection import open_connection
from blahvm.hypervisor.errors import SpecError, StorageError, VolumeExists
from blahvm.hypervisor.images import ImageInfo, inspect_image
from blahvm.hypervisor.naming import disk_volume_name, guest_name, scratch_volume_name
from blahvm.hypervisor.storage import GOLDEN_POOL_PREFIX, ClonePool, VolumeInfo

QEMU_IMG = shutil.which("qemu-img")
real_libvirt = pytest.mark.skipif(
    not os.path.exists("/run/libvirt/libvirt-sock") or QEMU_IMG is None,
    reason="needs a running libvirtd (qemu:///system) and qemu-img",
)


# -- test:///default: in memory, no files ---------------------------------------------------------


@pytest.fixture
def test_pool():
    with open_connection("test:///default", timeout=10) as conn:
        yield ClonePool.ensure(conn, "blahvm", "/var/lib/blahvm/clones")


def test_pool_is_defined_started_and_autostarted(test_pool):
    raw = test_pool.conn.raw.storagePoolLookupByName("blahvm")
    assert raw.isActive() and raw.autostart()
    assert test_pool.path == "/var/lib/blahvm/clones"
    again = ClonePool.ensure(test_pool.conn, "blahvm", "/var/lib/blahvm/clones/")  # idempotent
    assert again.path == test_pool.path


def test_pool_at_another_path_is_refused(test_pool):
    with pytest.raises(StorageError, match="exists at /var/lib/blahvm/clones, the config says /srv/x"):
        ClonePool.ensure(test_pool.conn, "blahvm", "/srv/x")


def test_overlay_scratch_list_delete_on_test_driver(test_pool):
    golden_path = test_pool.create_scratch("golden.qcow2", 100 << 20)
    golden = ImageInfo(golden_path, "qcow2", 100 << 20)
    guest = guest_name("4711[3]")
    disk = test_pool.clone_overlay(golden, disk_volume_name(guest))
    scratch = test_pool.create_scratch(scratch_volume_name(guest), 1 << 30)
    assert disk == f"/var/lib/blahvm/clones/{guest}.qcow2"
    assert scratch == f"/var/lib/blahvm/clones/{guest}-scratch.qcow2"
    names = [volume.name for volume in test_pool.list_volumes()]
    assert names == sorted(["golden.qcow2", f"{guest}.qcow2", f"{guest}-scratch.qcow2"])
    backing = ET.fromstring(test_pool.conn.raw.storageVolLookupByPath(disk).XMLDesc(0))
    assert backing.findtext("backingStore/path") == golden_path
    assert test_pool.delete_volume(disk_volume_name(guest)) is True
    assert test_pool.delete_volume(disk_volume_name(guest)) is False  # gone is fine
    assert test_pool.volume_path(disk_volume_name(guest)) is None


def test_existing_volume_is_not_overwritten(test_pool):
    test_pool.create_scratch("x.qcow2", 1 << 20)
    with pytest.raises(VolumeExists, match="x.qcow2 already exists in pool blahvm: delete it first"):
        test_pool.create_scratch("x.qcow2", 1 << 20)


@pytest.mark.parametrize("name", ["../evil.qcow2", "a/b", "", " x", "-rf"])
def test_unsafe_volume_names_are_refused(test_pool, name):
    with pytest.raises(SpecError, match="not a safe guest or volume name"):
        test_pool.create_scratch(name, 1 << 20)
    with pytest.raises(SpecError):
        test_pool.delete_volume(name)


def test_scratch_needs_a_positive_size(test_pool):
    with pytest.raises(StorageError, match="size must be positive"):
        test_pool.create_scratch("s.qcow2", 0)


# -- qemu:///system: real files ---------------------------------------------------------------------


@pytest.fixture
def real_pool(tmp_path):
    name = f"blahvm-test-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "clones"
    with open_connection("qemu:///system", timeout=30) as conn:
        try:
            yield ClonePool.ensure(conn, name, str(directory))
        finally:
            raw = conn.raw
            for pool in raw.listAllStoragePools(0):
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
                if pool.name() == name or (
                    pool.name().startswith(GOLDEN_POOL_PREFIX) and path.startswith(str(tmp_path))
                ):
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()


def qemu_img(*args):
    return subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, text=True).stdout


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        for chunk in iter(lambda: image.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@real_libvirt
def test_real_overlay_has_the_golden_as_backing(real_pool, tmp_path):
    golden_path = str(tmp_path / "slc4.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", golden_path, "100M")
    before = sha256_file(golden_path), os.stat(golden_path).st_mtime_ns
    golden = inspect_image("slc4", golden_path)
    path = real_pool.clone_overlay(golden, "blahvm-1-abcdef01.qcow2")
    assert os.path.isfile(path) and os.path.dirname(path) == str(tmp_path / "clones")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.path.getsize(path) < 1 << 20  # an overlay, not a copy
    # The overlay is ours (trusted), so it may be inspected; and it must name the golden.
    info = qemu_img("info", "-U", "--output=json", path)
    assert f'"backing-filename": "{golden_path}"' in info
    assert '"backing-filename-format": "qcow2"' in info
    assert '"virtual-size": 104857600' in info
    assert (sha256_file(golden_path), os.stat(golden_path).st_mtime_ns) == before
    assert real_pool.list_volumes() == (
        VolumeInfo("blahvm-1-abcdef01.qcow2", path, 100 << 20, os.stat(path).st_blocks * 512),
    )
    assert real_pool.delete_volume("blahvm-1-abcdef01.qcow2") is True
    assert not os.path.exists(path)
    assert real_pool.delete_volume("blahvm-1-abcdef01.qcow2") is False


@real_libvirt
def test_real_overlay_on_a_raw_golden_and_a_scratch_disk(real_pool, tmp_path):
    golden_path = str(tmp_path / "big.raw")
    with open(golden_path, "wb") as golden:
        golden.truncate(2 << 30)  # sparse 2 GiB
    path = real_pool.clone_overlay(inspect_image("big", golden_path), "o.qcow2")
    info = qemu_img("info", "-U", "--output=json", path)
    assert '"backing-filename-format": "raw"' in info and '"virtual-size": 2147483648' in info
    scratch = real_pool.create_scratch("s.qcow2", 3 << 30)
    assert '"virtual-size": 3221225472' in qemu_img("info", "-U", "--output=json", scratch)
    assert "backing" not in qemu_img("info", "-U", "--output=json", scratch)


@real_libvirt
def test_real_full_copy(real_pool, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    golden_path = str(images / "slc4.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", golden_path, "64M")
    qemu_img("convert", "-O", "qcow2", golden_path, str(images / "scratch.qcow2"))  # a neighbour
    path = real_pool.clone_copy(inspect_image("slc4", golden_path), "copy.qcow2")
    info = qemu_img("info", "-U", "--output=json", path)
    assert "backing" not in info and '"virtual-size": 67108864' in info
    # Copying from a golden that is already in a pool reuses that pool.
    assert real_pool.clone_copy(inspect_image("slc4", golden_path), "copy2.qcow2").endswith("copy2.qcow2")


@real_libvirt
def test_real_seed_volume_holds_exactly_the_bytes_uploaded_and_is_roots_alone(real_pool, tmp_path):
    from blahvm.context import JobContext, make_seed, read_seed, seed_files

    image = make_seed(seed_files(JobContext("blahvm-1-abcdef01-0011", "blahvm-1-abcdef01", "alice", "alice", 1001,
                                            1001)))
    path = real_pool.create_seed("blahvm-1-abcdef01-seed.iso", image)
    assert os.path.dirname(path) == str(tmp_path / "clones")
    status = os.stat(path)
    assert (status.st_uid, status.st_mode & 0o777) == (0, 0o600)  # libvirt lends it to QEMU while a guest runs
    with open(path, "rb") as seed:
        assert seed.read() == image
    assert read_seed(image)[""] == "cidata"
    with pytest.raises(VolumeExists):
        real_pool.create_seed("blahvm-1-abcdef01-seed.iso", image)
    assert real_pool.delete_volume("blahvm-1-abcdef01-seed.iso") is True
    assert not os.path.exists(path)
