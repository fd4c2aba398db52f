"""Shared fixtures. With BLAHVM_STRICT=1 (scripts/test, CI) a skipped test fails: every test must run."""

import os

import pytest

from tests.fixtures_image import demo_image, demo_image_dir  # noqa: F401  (session fixtures)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BLAHVM_STRICT") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under BLAHVM_STRICT=1: {report.longrepr}"
