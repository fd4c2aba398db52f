"""Golden images: the demo image blahvm's tests and new sites boot, built from Debian packages."""

from blahvm.image.demo import DEFAULT_DEST, DemoImage, build_demo_image, print_progress
from blahvm.image.errors import ImageBuildError

__all__ = ["DEFAULT_DEST", "DemoImage", "ImageBuildError", "build_demo_image", "print_progress"]
