"""Session fixtures for tests that need the demo golden image or a real guest booted from it.

Import them in tests/conftest.py: ``from tests.fixtures_image import demo_image, demo_image_dir``
(or ``pytest_plugins = ["tests.fixtures_image"]``).

The images are built once per machine and reused (each is cached by content under the directories
below, outside the checkout); set BLAHVM_TEST_IMAGE_DIR or BLAHVM_TEST_CLOUD_IMAGE_DIR to build them
elsewhere.
"""

from __future__ import annotations

import os

import pytest

from blahvm.image import DemoImage, ImageBuildError, build_demo_image
from blahvm.image.cloud import CloudImage, build_cloud_image

DEFAULT_TEST_IMAGE_DIR = "/var/lib/blahvm/images/demo"
DEFAULT_TEST_CLOUD_IMAGE_DIR = "/var/lib/blahvm/images/cloud"


@pytest.fixture(scope="session")
def demo_image_dir() -> str:
    return os.environ.get("BLAHVM_TEST_IMAGE_DIR", DEFAULT_TEST_IMAGE_DIR)


@pytest.fixture(scope="session")
def demo_image(demo_image_dir: str) -> DemoImage:
    """The demo golden image (golden.qcow2, vmlinuz, initrd.img), built on first use."""
    if os.geteuid() != 0:
        pytest.skip("building the demo image needs root (chroot, image directory under /var/lib)")
    lines = []
    try:
        return build_demo_image(demo_image_dir, progress=lines.append)
    except ImageBuildError as error:
        pytest.fail(f"cannot build the demo image: {error}\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(scope="session")
def cloud_image() -> CloudImage:
    """The stock-like cloud image (golden.qcow2 that boots by itself, cloud-init, no agent), built on
    first use (mmdebstrap: a minute or two) and reused after."""
    if os.geteuid() != 0:
        pytest.skip("building the cloud image needs root (mmdebstrap, image directory under /var/lib)")
    lines = []
    try:
        image = build_cloud_image(os.environ.get("BLAHVM_TEST_CLOUD_IMAGE_DIR", DEFAULT_TEST_CLOUD_IMAGE_DIR),
                                  progress=lines.append)
    except ImageBuildError as error:
        pytest.fail(f"cannot build the cloud image: {error}\n" + "\n".join(lines), pytrace=False)
    print("\n".join(lines))  # the build's (or reuse's) time, for -s
    return image
