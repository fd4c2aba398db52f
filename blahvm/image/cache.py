"""What every image builder shares: a cache of finished images keyed by content, one builder at a time.

An image is built in a scratch directory under the cache and renamed into ``DEST/KEY`` when complete,
under a lock, so a crash never leaves a half image that looks finished and two builders never race.
Each builder's ``load`` decides whether a directory holds a finished image (its manifest is written
last) and its ``build`` fills the scratch ``out`` directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple, TypeVar

from blahvm.image.errors import ImageBuildError

Progress = Callable[[str], None]
T = TypeVar("T")


def print_progress(line: str) -> None:
    """A ``progress`` callable that writes each line to stderr."""
    print(line, file=sys.stderr, flush=True)


def source_key(label: bytes, modules: Iterable[str], extra: bytes = b"") -> str:
    """A short hash of the named modules of this package (their source) and ``extra``."""
    digest = hashlib.sha256(label + b"\0")
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(modules):
        with open(os.path.join(here, name + ".py"), "rb") as stream:
            digest.update(name.encode() + b".py\0" + stream.read() + b"\0")
    digest.update(extra)
    return digest.hexdigest()[:16]


class Steps:
    """Reports each build step as it starts and how long it took: ``what image: step ...``."""

    def __init__(self, report: Progress, what: str) -> None:
        self.report, self.what = report, what

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        self.report(f"{self.what}: {step} ...")
        started = time.monotonic()
        yield
        self.report(f"{self.what}: {step}: {time.monotonic() - started:.1f}s")


@contextlib.contextmanager
def locked(path: str, report: Progress, what: str) -> Iterator[None]:
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"{what}: waiting for another build of it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_dest(dest: str) -> None:
    try:
        os.makedirs(dest, mode=0o755, exist_ok=True)
    except OSError as error:
        raise ImageBuildError(f"cannot create the image directory {dest}: {error.strerror}") from None


def build_cached(
    dest: str,
    key: str,
    what: str,
    load: Callable[[str], Optional[T]],
    build: Callable[[str, str, Steps], None],
    report: Progress,
) -> Tuple[T, bool]:
    """The image ``load`` finds in ``dest/key``, else built by ``build(work, out, steps)`` first;
    and whether it was built now.

    ``build`` leaves the finished image in ``out`` (inside the scratch directory ``work``), which is
    then renamed to ``dest/key``. The caller checks for a cached image first, without the lock.
    """
    with locked(os.path.join(dest, ".lock"), report, what):
        cached = load(os.path.join(dest, key))  # another builder may have finished meanwhile
        if cached is not None:
            report(f"{what}: reusing {os.path.join(dest, key)}")
            return cached, False
        for stale in glob.glob(os.path.join(dest, ".build-*")):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        work = tempfile.mkdtemp(prefix=".build-", dir=dest)
        try:
            started = time.monotonic()
            out = os.path.join(work, "out")
            os.mkdir(out, 0o755)
            build(work, out, Steps(report, what))
            os.rename(out, os.path.join(dest, key))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = load(os.path.join(dest, key))
        assert image is not None, "a completed build must load"
        report(f"{what}: built {os.path.join(dest, key)} in {time.monotonic() - started:.1f}s")
        return image, True


def reclaim_golden(path: str) -> None:
    """The golden disk ``path`` root's and read-only again (as root; else left as found).

    An older blahvm let libvirt chown goldens to QEMU's user for good, and prepare now refuses a
    golden anyone but root could write. Taking it back is safe: the changed ctime makes the next
    prepare hash the golden again against the sha256 in the manifest, which stayed root's. Kernels
    and initrds are left alone: libvirt lends them to QEMU's user while any guest runs and counts
    its loans in their xattrs; taking one back under a running guest makes libvirt refuse every
    later start ("Setting different DAC user or group ... already in use").
    """
    if os.geteuid() != 0:
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if (status.st_uid, status.st_gid) != (0, 0):
            os.fchown(fd, 0, 0)
        if status.st_mode & 0o7777 != 0o444:
            os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
