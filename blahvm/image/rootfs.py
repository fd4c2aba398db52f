"""The demo guest's root filesystem: a directory tree made from unpacked .debs, then an ext4 qcow2 disk."""

from __future__ import annotations

import os
import shutil
import stat
from typing import Iterable, Mapping, Tuple

from blahvm.image.commands import run
from blahvm.image.errors import ImageBuildError

# Unneeded in a guest that only runs jobs through the agent; removing them keeps the image small.
_PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/locale")

DIRECTORIES = ("dev", "proc", "sys", "tmp", "run", "root", "home", "mnt", "var/tmp", "etc", "lib/modules/blahvm")

ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "localhost\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


def make_directories(root: str, directories: Iterable[str] = DIRECTORIES) -> None:
    for directory in directories:
        os.makedirs(os.path.join(root, directory), mode=0o755, exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "var/tmp"), 0o1777)
    os.chmod(os.path.join(root, "root"), 0o700)


def write_file(root: str, path: str, content: bytes, mode: int = 0o644) -> None:
    """Write ``content`` at ``path`` (relative to ``root``), replacing a file or link already there."""
    target = os.path.join(root, path)
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.lexists(target):
        os.unlink(target)
    with open(target, "wb") as stream:
        stream.write(content)
    os.chmod(target, mode)


def link_busybox_applets(root: str) -> int:
    """Symlink every busybox applet not provided otherwise to /bin/busybox; the number linked."""
    busybox = os.path.join(root, "bin/busybox")
    linked = 0
    for applet in run([busybox, "--list-full"]).split():
        target = os.path.join(root, applet)
        if os.path.lexists(target):
            continue
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.symlink("/bin/busybox", target)
        linked += 1
    return linked


def prune(root: str) -> None:
    for path in _PRUNED:
        shutil.rmtree(os.path.join(root, path), ignore_errors=True)


def in_chroot(root: str, argv: Iterable[str]) -> str:
    """Run a program of the guest's userland inside it (the host kernel runs it: same architecture)."""
    argv = list(argv)
    try:
        return run(["/usr/sbin/chroot", root, *argv], env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except ImageBuildError as error:
        raise ImageBuildError(f"in the guest's root tree, {' '.join(argv[:3])}: {error}") from None


def check_python(root: str, python: str, modules: Iterable[str]) -> None:
    """Fail the build unless the guest's python imports ``modules``."""
    in_chroot(root, [python, "-I", "-c", "import " + ", ".join(modules)])


def precompile(root: str, python: str, directories: Iterable[str]) -> None:
    """Byte-compile ``directories`` with the guest's own python, so the agent starts fast in the guest.

    ``unchecked-hash`` pycs are used as they are, whatever the source files' timestamps.
    """
    in_chroot(
        root,
        [python, "-I", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", *directories],
    )


def tree_size(root: str) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for filename in files:
            info = os.lstat(os.path.join(directory, filename))
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def make_ext4(root: str, raw: str, size: int, label: str = "blahvm-root") -> None:
    """An ext4 filesystem image of ``size`` bytes holding the tree at ``root`` (owners kept)."""
    with open(raw, "wb") as stream:
        stream.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", root, raw])


def to_qcow2(raw: str, qcow2: str) -> None:
    """A standalone qcow2 (no backing file) with the contents of the raw image ``raw``."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2])


def write_files(root: str, files: Mapping[str, Tuple[bytes, int]]) -> None:
    for path, (content, mode) in files.items():
        write_file(root, path, content, mode)
