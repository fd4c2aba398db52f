"""A real guest on the demo golden leaves the golden root's: libvirt never hands it to QEMU's user.

Before, libvirt's DAC driver chowned each golden to libvirt-qemu when a guest first started on it
and never gave it back, so QEMU's user could rewrite it (issue 12). Real boots in this file: 1.
"""

from __future__ import annotations

import os
import stat
import uuid
import xml.etree.ElementTree as ET

import pytest

from tests.test_lifecycle import guest_of
from blahvm.hypervisor.connection import open_connection
from blahvm.lifecycle import prepare, teardown
from blahvm.model import Outcome
from tests.as_user import run_as, write_at
from tests.test_lifecycle_reliability import REAL_URI, build_config, build_job, real_params

pytest.importorskip("libvirt")
pytestmark = pytest.mark.guest


def golden_state(path):
    status = os.stat(path)
    return status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)


def qemu_opens_read_only(guest: str, path: str) -> bool:
    """Every descriptor QEMU holds on ``path`` is read-only (and it holds at least one)."""
    with open(f"/run/libvirt/qemu/{guest}.pid") as pid_file:
        pid = int(pid_file.read())
    modes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != os.path.realpath(path):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
        except (FileNotFoundError, StopIteration):
            continue
        modes.append(flags & os.O_ACCMODE)
    return bool(modes) and all(mode == os.O_RDONLY for mode in modes)


def test_a_guest_leaves_its_golden_roots_and_unwritable_by_qemu(demo_image):
    golden = demo_image.image
    before = golden_state(golden)
    assert before[:2] == (0, 0), f"the demo golden {golden} is not root's to begin with: {before}"
    with real_params(demo_image, max_guests=1) as (params, made):
        config = build_config(params)
        job = build_job(f"golden-{uuid.uuid4().hex[:6]}", params)
        made.add(guest_of(config, job.job_id))
        try:
            result = prepare(config, job, ready_timeout=None)  # started: QEMU has opened its disks
            assert result.outcome is Outcome.OK, result.message
            with open_connection(REAL_URI, timeout=30) as conn:
                live = ET.fromstring(conn.raw.lookupByName(result.guest).XMLDesc(0))
            store = live.find("devices/disk/backingStore")
            assert store.find("source").get("file") == golden
            assert store.find("source/seclabel").attrib == {"model": "dac", "relabel": "no"}
            assert qemu_opens_read_only(result.guest, golden)
            assert golden_state(golden) == before  # while the guest runs ...
            assert run_as("libvirt-qemu", write_at(golden, 4096, b"EVILEVIL")) == "PermissionError"
        finally:
            assert teardown(config, job.job_id).outcome is Outcome.OK
        assert golden_state(golden) == before  # ... and after it is gone
        assert run_as("libvirt-qemu", write_at(golden, 4096, b"EVILEVIL")) == "PermissionError"
        assert run_as("libvirt-qemu", lambda: os.chmod(golden, 0o666) or "chmodded") == "PermissionError"
