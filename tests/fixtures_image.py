"""Session fixtures for tests that need the demo golden image or a real guest booted from it.

Import them in tests/conftest.py: ``from tests.fixtures_image import demo_image, demo_image_dir``
(or ``pytest_plugins = ["tests.fixtures_image"]``).

The image is built once per machine and reused (it is cached by content under the directory below);
set BLAHVM_TEST_IMAGE_DIR to build it elsewhere.
"""

from __future__ import annotations

import os

import pytest

from blahvm.image import DemoImage, ImageBuildError, build_demo_image

DEFAULT_TEST_IMAGE_DIR = "/var/lib/blahvm/images/demo"


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
