"""The demo golden image: a Debian cloud kernel, a busybox initramfs and a small qcow2 root disk
with python3 and the blahvm guest agent, built from Debian packages only and cached by content.

The cache key covers this package's code and the agent's source, so a change to either builds a new
image beside the old one (guests still running on the old one keep their backing file). Builds run
in a temporary directory that is renamed into place when complete, under a lock, so a crash never
leaves a half image that looks finished and two builders never race.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from typing import List, Optional

import attrs
import yaml

from blahvm.image import cpio, debs, guest_init, kmod, rootfs
from blahvm.image.cache import Progress, Steps, build_cached, make_dest, print_progress, reclaim_golden, source_key
from blahvm.image.errors import ImageBuildError
from blahvm.model import Environment
from blahvm.quantities import Size

DEFAULT_DEST = "/var/lib/blahvm/images/demo"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
DEMO_MEMORY = Size.parse("256MiB")
DEMO_VCPUS = 1

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
# python3 with enough of the stdlib for a stdlib-only agent, the shared libraries it links, busybox.
USERLAND_PACKAGES = (
    "libc6",
    "libgcc-s1",  # glibc needs it to unwind threads on pthread_exit
    "zlib1g",
    "libexpat1",
    "libssl3",  # hashlib, ssl
    "libffi8",  # ctypes
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "busybox-static",
)
PYTHON = "/usr/bin/python3.11"
AGENT_IMPORTS = (
    "json", "struct", "os", "select", "signal", "subprocess", "pwd", "grp", "fcntl", "errno",
    "time", "argparse", "threading", "socket", "queue", "uuid", "fnmatch", "stat", "hashlib",
    "base64", "shutil",
)  # fmt: skip
BOOT_MODULES = ("virtio_pci", "virtio_blk")  # to find and mount the root disk
GUEST_MODULES = ("virtio_console", "fuse", "virtiofs")  # the agent's port; sharing the job's directory
MIN_DISK = 512 * 1024**2  # free room for jobs; a qcow2 stores no empty clusters

GOLDEN, KERNEL, INITRD, MANIFEST = "golden.qcow2", "vmlinuz", "initrd.img", "manifest.json"
# The modules that make this image: a change to another (the cloud image's builder) leaves its key alone.
KEY_MODULES = ("cache", "commands", "cpio", "debs", "demo", "errors", "guest_init", "kmod", "rootfs")
WHAT = "demo image"

__all__ = ["DEFAULT_DEST", "DemoImage", "build_demo_image", "image_key", "print_progress"]


@attrs.frozen
class DemoImage:
    """A built demo image: everything an ``environments:`` entry needs to boot it."""

    directory: str
    image: str  # golden.qcow2, read-only, no backing file
    sha256: str  # of golden.qcow2
    kernel: str
    initrd: str
    cmdline: str
    key: str
    agent_sha256: Optional[str]  # None: built without an agent
    reused: bool = attrs.field(default=False, eq=False)  # found in the cache rather than built now

    def environment(self, name: str = "demo") -> Environment:
        return Environment(
            name=name,
            image=self.image,
            flavour="kvm",
            memory=DEMO_MEMORY,
            vcpus=DEMO_VCPUS,
            sha256=self.sha256,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
        )

    def environment_yaml(self, name: str = "demo") -> str:
        """The entry to put under ``environments:`` in a site config."""
        entry = {
            "image": self.image,
            "sha256": self.sha256,
            "flavour": "kvm",
            "memory": str(DEMO_MEMORY),
            "vcpus": DEMO_VCPUS,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "cmdline": self.cmdline,
        }
        return yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=False)


def agent_path() -> str:
    """Where the guest agent's source lives in this package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guest", "agent.py")


def _read_agent() -> Optional[bytes]:
    try:
        with open(agent_path(), "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ImageBuildError(f"cannot read the guest agent {agent_path()}: {error.strerror}") from None


def image_key(agent: Optional[bytes]) -> str:
    """A short hash of everything that makes the image: the builder's code and the agent."""
    return source_key(b"blahvm demo image", KEY_MODULES, b"agent\0" + (agent if agent is not None else b"none"))


def build_demo_image(dest: Optional[str] = None, progress: Optional[Progress] = None) -> DemoImage:
    """The demo image under ``dest`` (default /var/lib/blahvm/images/demo), built unless cached."""
    dest = os.path.abspath(dest or DEFAULT_DEST)
    report = progress or (lambda line: None)
    agent = _read_agent()
    key = image_key(agent)
    cached = _load(os.path.join(dest, key))
    if cached is not None:
        report(f"{WHAT}: reusing {cached.directory}")
        return _reclaimed(cached)
    if os.geteuid() != 0:
        # chroot runs the guest's python, and the guest's files must be owned by root
        raise ImageBuildError(f"no demo image in {dest} yet, and building one needs root")
    make_dest(dest)
    if agent is None:
        report(f"{WHAT}: no guest agent at {agent_path()}: building without one")

    def build(work: str, out: str, steps: Steps) -> None:
        _Build(work, out, dest, key, agent, steps).run()

    try:
        image, built = build_cached(dest, key, WHAT, _load, build, report)
    except OSError as error:  # a full disk, a read-only directory: one line, not a traceback
        raise ImageBuildError(f"building the demo image in {dest} failed: {error}") from None
    return attrs.evolve(image, reused=False) if built else _reclaimed(image)


def _load(directory: str) -> Optional[DemoImage]:
    """The image in ``directory`` if it is complete (the manifest is written last), else None."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as stream:
            manifest = json.load(stream)
    except (OSError, ValueError):
        return None
    paths = {name: os.path.join(directory, name) for name in (GOLDEN, KERNEL, INITRD)}
    if not all(os.path.isfile(path) for path in paths.values()):
        return None
    try:
        return DemoImage(
            directory=directory,
            image=paths[GOLDEN],
            sha256=manifest["sha256"],
            kernel=paths[KERNEL],
            initrd=paths[INITRD],
            cmdline=manifest["cmdline"],
            key=manifest["key"],
            agent_sha256=manifest["agent_sha256"],
            reused=True,
        )
    except (KeyError, TypeError):  # not a manifest this builder wrote
        return None


def _reclaimed(image: DemoImage) -> DemoImage:
    reclaim_golden(image.image)
    return image


class _Build:
    """One build in the scratch directory ``work``; the finished image is left in ``work/out``."""

    def __init__(self, work: str, out: str, dest: str, key: str, agent: Optional[bytes], step: Steps) -> None:
        self.work, self.out, self.dest, self.key, self.agent, self.step = work, out, dest, key, agent, step
        self.root = os.path.join(work, "root")
        self.kernel_tree = os.path.join(work, "kernel")
        for directory in (self.root, self.kernel_tree):
            os.makedirs(directory, mode=0o755)

    def run(self) -> None:
        with self.step("resolving Debian packages"):
            kernel_package = debs.resolve_metapackage(KERNEL_METAPACKAGE)
            packages = debs.resolve([kernel_package, *USERLAND_PACKAGES])
        megabytes = sum(package.size for package in packages) / 1e6
        with self.step(f"fetching {len(packages)} packages ({megabytes:.0f} MB) into {self.dest}/debs"):
            files = debs.fetch(packages, os.path.join(self.dest, "debs"))
        with self.step("unpacking"):
            debs.extract(files[0], self.kernel_tree)
            for deb in files[1:]:
                debs.extract(deb, self.root)
        version = self._kernel_version()
        with self.step(f"kernel {version} and its modules"):
            shutil.copyfile(os.path.join(self.kernel_tree, "boot", f"vmlinuz-{version}"), self._out(KERNEL))
            modules = kmod.index_modules(os.path.join(self.kernel_tree, "lib", "modules", version))
            depends = kmod.dependencies(modules, BOOT_MODULES + GUEST_MODULES)
            boot_order = kmod.load_order(BOOT_MODULES, depends)
            guest_order = kmod.load_order(GUEST_MODULES, depends, loaded=boot_order)
        with self.step("initramfs"):
            self._initramfs(modules, boot_order)
        with self.step("root filesystem tree"):
            self._root_tree(modules, guest_order)
        with self.step("checking and byte-compiling the guest's python"):
            rootfs.check_python(self.root, PYTHON, AGENT_IMPORTS)
            sources = ["/usr/lib/python3.11"] + (["/usr/lib/blahvm"] if self.agent is not None else [])
            rootfs.precompile(self.root, PYTHON, sources)
            if self.agent is not None:  # proves the agent starts with the guest's python
                rootfs.in_chroot(self.root, ["/usr/bin/python3", guest_init.AGENT_PATH, "--version"])
        with self.step("ext4 root disk and qcow2 golden image"):
            size = max(MIN_DISK, _round_up(2 * rootfs.tree_size(self.root) + 64 * 1024**2, 1024**2))
            raw = os.path.join(self.work, "root.raw")
            rootfs.make_ext4(self.root, raw, size)
            rootfs.to_qcow2(raw, self._out(GOLDEN))
            os.unlink(raw)
        with self.step("checksum and manifest"):
            self._manifest(packages, version)

    def _out(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _kernel_version(self) -> str:
        versions = os.listdir(os.path.join(self.kernel_tree, "lib", "modules"))
        if len(versions) != 1:
            raise ImageBuildError(f"expected one kernel in the kernel package, found {sorted(versions)}")
        return versions[0]

    def _initramfs(self, modules: dict, boot_order: List[str]) -> None:
        with open(os.path.join(self.root, "bin", "busybox"), "rb") as stream:
            busybox = stream.read()
        entries = [cpio.Entry.directory(path) for path in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")]
        entries.append(cpio.Entry.char_device("dev/console", 5, 1))
        entries.append(cpio.Entry.file("bin/busybox", busybox, 0o755))
        entries.append(cpio.Entry.file("init", guest_init.initramfs_init(boot_order).encode(), 0o755))
        for name in boot_order:
            with open(modules[name], "rb") as stream:
                entries.append(cpio.Entry.file(f"lib/modules/{name}.ko", stream.read()))
        with open(self._out(INITRD), "wb") as stream:
            stream.write(gzip.compress(cpio.newc_archive(entries), compresslevel=6, mtime=0))

    def _root_tree(self, modules: dict, guest_order: List[str]) -> None:
        root = self.root
        rootfs.make_directories(root)
        rootfs.link_busybox_applets(root)
        rootfs.prune(root)
        python3 = os.path.join(root, "usr", "bin", "python3")
        if not os.path.lexists(python3):
            os.symlink(os.path.basename(PYTHON), python3)
        files = {path: (text.encode(), 0o644) for path, text in rootfs.ETC_FILES.items()}
        files["sbin/init"] = (guest_init.root_init(guest_order).encode(), 0o755)
        for name in guest_order:
            with open(modules[name], "rb") as stream:
                files[f"lib/modules/blahvm/{name}.ko"] = (stream.read(), 0o644)
        if self.agent is not None:
            files[guest_init.AGENT_PATH.lstrip("/")] = (self.agent, 0o644)
        rootfs.write_files(root, files)

    def _manifest(self, packages: List[debs.Package], kernel_version: str) -> None:
        manifest = {
            "key": self.key,
            "sha256": debs.sha256_of(self._out(GOLDEN)),
            "cmdline": DEFAULT_CMDLINE,
            "kernel_version": kernel_version,
            "agent_sha256": hashlib.sha256(self.agent).hexdigest() if self.agent is not None else None,
            "packages": {package.name: package.version for package in packages},
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for name in (GOLDEN, KERNEL, INITRD):
            os.chmod(self._out(name), 0o444)  # golden files are never written in place
        with open(self._out(MANIFEST), "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.chmod(self._out(MANIFEST), 0o444)
        os.chmod(self.out, 0o755)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
