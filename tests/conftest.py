"""Shared fixtures. With BLAHVM_STRICT=1 (scripts/test, CI) a skipped test fails: every test must run,
except the real volclava and OpenPBS tests on a checkout without ../shared/batch-systems beside it
(tests/real_batch.py), which have nothing to build them from."""

import hashlib
import os

import pytest

from tests.fixtures_image import cloud_image, demo_image, demo_image_dir  # noqa: F401  (session fixtures)
from tests.real_batch import NO_SHARED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BLAHVM_STRICT") and report.skipped and NO_SHARED not in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped under BLAHVM_STRICT=1: {report.longrepr}"


@pytest.fixture
def keep_driver():
    """test:///default lives as long as one connection to it: hold one across the calls under test."""
    from blahvm.hypervisor.connection import open_connection

    with open_connection("test:///default", timeout=10) as conn:
        yield conn


@pytest.fixture
def golden(tmp_path):
    """A 1 MiB raw golden image and its sha256, for the test:///default driver (which never reads it)."""
    path = tmp_path / "golden.raw"
    path.write_bytes(b"\0" * 2**20)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()
