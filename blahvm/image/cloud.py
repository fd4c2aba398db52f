"""A stock-like Debian 12 cloud image: systemd, Debian's own cloud-init and python3, and no blahvm inside.

What a site downloads as Debian's "genericcloud" image, built here from Debian packages so that the
suite and new sites can boot a real cloud-init guest without a download: a disk that boots by itself
(an MBR with syslinux's boot code, a small FAT partition with syslinux, the kernel and its initramfs,
and the ext4 root), so its ``environments:`` entry names no kernel, as an entry for a downloaded
image would not. Jobs reach such a guest only through the per-job NoCloud seed of ``context:
cloud-init``: no password, no key and no blahvm agent are in the image.

The root tree is made by mmdebstrap (maintainer scripts run, as on a real install) from the Debian
archive the host's apt uses; cloud-init looks for NoCloud only (then None), and nothing waits for a
network, so the guest boots without one. Cached by content as the demo image is (blahvm.image.cache).
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from typing import Dict, List, Optional, Sequence, Tuple

import attrs
import yaml

from blahvm.image import rootfs
from blahvm.image.cache import Progress, Steps, build_cached, make_dest, reclaim_golden, source_key
from blahvm.image.commands import run
from blahvm.image.debs import sha256_of
from blahvm.image.errors import ImageBuildError
from blahvm.model import Environment
from blahvm.quantities import Size

DEFAULT_DEST = "/var/lib/blahvm/images/cloud"
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "udev",  # loads the drivers of the disks, cdroms and virtio ports the guest is given
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "cloud-init",
    "python3",  # cloud-init's, and the agent's that the seed brings
)
CLOUD_MEMORY = Size.parse("512MiB")  # systemd and cloud-init's python; 256 MiB boots, barely
CLOUD_VCPUS = 1
ROOT_LABEL = "cloud-root"
BOOT_LABEL = "BOOT"
CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=ttyS0"
SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"  # syslinux-common
SECTOR = 512
BOOT_START = 1024**2  # the first partition starts at 1 MiB, as partitioning tools align it
MIN_ROOT = 2 * 1024**3  # free room for jobs; a qcow2 stores no empty clusters

# Units the guest never needs: waits for a network it may not have, and upkeep of an image that
# lives as long as one job (e2scrub_reap alone took 3.6 s of the one vcpu at boot under TCG).
MASKED_UNITS = ("systemd-networkd-wait-online.service",)
DISABLED_UNITS = (
    "timers.target.wants/apt-daily.timer",
    "timers.target.wants/apt-daily-upgrade.timer",
    "timers.target.wants/dpkg-db-backup.timer",
    "timers.target.wants/e2scrub_all.timer",
    "timers.target.wants/fstrim.timer",
    "multi-user.target.wants/e2scrub_reap.service",
)

CLOUD_CFG = """\
# blahvm: the per-job seed is a NoCloud volume labelled cidata; never wait for a metadata service.
datasource_list: [NoCloud, None]
# no locales package in this image: the locale module would fail ("false" skips it; a bare false is
# not valid cloud-config)
locale: "false"
"""

GOLDEN, MANIFEST = "golden.qcow2", "manifest.json"
KEY_MODULES = ("cache", "cloud", "commands", "debs", "errors", "rootfs")
WHAT = "cloud image"


@attrs.frozen
class CloudImage:
    """A built cloud image: a disk that boots by itself, with cloud-init and no blahvm inside."""

    directory: str
    image: str  # golden.qcow2, read-only, no backing file
    sha256: str
    key: str
    python: str  # the guest's python3 version
    cloud_init: str  # the guest's cloud-init version
    reused: bool = attrs.field(default=False, eq=False)

    def environment(self, name: str = "cloud") -> Environment:
        return Environment(
            name=name, image=self.image, flavour="kvm", memory=CLOUD_MEMORY, vcpus=CLOUD_VCPUS,
            sha256=self.sha256, context="cloud-init",
        )

    def environment_entry(self) -> Dict[str, object]:
        return {
            "image": self.image,
            "sha256": self.sha256,
            "flavour": "kvm",
            "memory": str(CLOUD_MEMORY),
            "vcpus": CLOUD_VCPUS,
            "context": "cloud-init",
        }

    def environment_yaml(self, name: str = "cloud") -> str:
        """The entry to put under ``environments:`` in a site config."""
        return yaml.safe_dump({name: self.environment_entry()}, sort_keys=False, default_flow_style=False)


def image_key() -> str:
    return source_key(b"blahvm cloud image", KEY_MODULES)


def build_cloud_image(dest: Optional[str] = None, progress: Optional[Progress] = None) -> CloudImage:
    """The cloud image under ``dest`` (default /var/lib/blahvm/images/cloud), built unless cached."""
    dest = os.path.abspath(dest or DEFAULT_DEST)
    report = progress or (lambda line: None)
    key = image_key()
    cached = _load(os.path.join(dest, key))
    if cached is not None:
        report(f"{WHAT}: reusing {cached.directory}")
        reclaim_golden(cached.image)
        return cached
    if os.geteuid() != 0:  # mmdebstrap installs as root, and the guest's files must be root's
        raise ImageBuildError(f"no cloud image in {dest} yet, and building one needs root")
    make_dest(dest)

    def build(work: str, out: str, steps: Steps) -> None:
        _Build(work, out, key, steps).run()

    try:
        image, built = build_cached(dest, key, WHAT, _load, build, report)
    except OSError as error:
        raise ImageBuildError(f"building the cloud image in {dest} failed: {error}") from None
    if built:
        return attrs.evolve(image, reused=False)
    reclaim_golden(image.image)
    return image


def _load(directory: str) -> Optional[CloudImage]:
    """The image in ``directory`` if it is complete (the manifest is written last), else None."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as stream:
            manifest = json.load(stream)
    except (OSError, ValueError):
        return None
    golden = os.path.join(directory, GOLDEN)
    if not os.path.isfile(golden):
        return None
    try:
        return CloudImage(
            directory=directory,
            image=golden,
            sha256=manifest["sha256"],
            key=manifest["key"],
            python=manifest["python"],
            cloud_init=manifest["cloud_init"],
            reused=True,
        )
    except (KeyError, TypeError):
        return None


def debian_sources(indextargets: str, suite: str = SUITE) -> List[str]:
    """One-line apt sources for ``suite`` and its -updates/-security from the host's apt index targets.

    ``indextargets`` is ``apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(ORIGIN)'``
    output: the archives the host's apt reaches (its mirror), of Debian's origin only, so that a
    third-party repository the host has never goes into the guest.
    """
    components: Dict[Tuple[str, str], List[str]] = {}
    for line in indextargets.splitlines():
        fields = line.split()
        if len(fields) != 4:
            continue
        uri, release, component, origin = fields
        if origin != "Debian" or not re.fullmatch(re.escape(suite) + r"(-updates|-security)?", release):
            continue
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^\s\[\]]+", uri) or not re.fullmatch(r"[a-z0-9-]+", component):
            continue
        found = components.setdefault((uri, release), [])
        if component not in found:
            found.append(component)
    if not any(release == suite for _, release in components):
        raise ImageBuildError(
            f"the host's apt knows no Debian {suite} archive: run `apt-get update` "
            "(scripts/install-system-packages does) with a Debian 12 mirror in its sources"
        )
    # the suite itself first: it names the mirror in the progress lines
    ordered = sorted(components.items(), key=lambda item: (item[0][1] != suite, item[0]))
    return [f"deb {uri} {release} {' '.join(names)}" for (uri, release), names in ordered]


def partition_table(boot_code: bytes, partitions: Sequence[Tuple[int, int, int, bool]], signature: int) -> bytes:
    """The first sector of an MBR disk: ``boot_code`` (at most 440 bytes), the disk signature and up to
    four primary partitions, each ``(type, first sector, sectors, bootable)``, addressed by LBA only."""
    if len(boot_code) > 440 or len(partitions) > 4:
        raise ValueError("an MBR has 440 bytes of boot code and four primary partitions")
    sector = bytearray(SECTOR)
    sector[: len(boot_code)] = boot_code
    struct.pack_into("<I", sector, 440, signature)
    for index, (kind, first, count, bootable) in enumerate(partitions):
        if not (0 < first and 0 < count and first + count <= 2**32):
            raise ValueError(f"partition {index + 1} does not fit an MBR: {first}+{count}")
        chs = b"\xfe\xff\xff"  # beyond CHS: the BIOS and boot code use the LBA fields
        entry = bytes([0x80 if bootable else 0]) + chs + bytes([kind]) + chs + struct.pack("<II", first, count)
        sector[446 + 16 * index : 446 + 16 * (index + 1)] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def syslinux_cfg(cmdline: str) -> str:
    return f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {cmdline}\n"


class _Build:
    """One build in the scratch directory ``work``; the finished image is left in ``out``."""

    def __init__(self, work: str, out: str, key: str, step: Steps) -> None:
        self.work, self.out, self.key, self.step = work, out, key, step
        self.root = os.path.join(work, "root")

    def run(self) -> None:
        with self.step("the host's Debian archive"):
            sources = debian_sources(
                run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT) $(ORIGIN)",
                     "Created-By: Packages"])
            )
        with self.step(f"installing {', '.join(PACKAGES)} with mmdebstrap from {sources[0].split()[1]}"):
            self._install(sources)
        with self.step("configuring cloud-init, systemd and the root filesystem"):
            self._configure()
        kernel, initrd = self._boot_files()
        with self.step("bootable disk (syslinux, FAT boot partition, ext4 root) and qcow2 golden image"):
            raw = os.path.join(self.work, "disk.raw")
            self._disk(raw, kernel, initrd)
            rootfs.to_qcow2(raw, os.path.join(self.out, GOLDEN))
            os.unlink(raw)
        with self.step("checksum and manifest"):
            self._manifest(kernel)

    def _install(self, sources: List[str]) -> None:
        run(
            [
                "mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=directory",
                "--include=" + ",".join(PACKAGES),
                "--aptopt=APT::Install-Recommends \"false\"",
                # what a guest that runs jobs never reads, as rootfs.prune for the demo
                "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/info/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-exclude=/usr/share/lintian/*",
                SUITE, self.root, *sources,
            ]
        )  # fmt: skip

    def _configure(self) -> None:
        root = self.root
        files = {
            "etc/cloud/cloud.cfg.d/90_blahvm.cfg": CLOUD_CFG,
            "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\n",
            # mmdebstrap copies the host's: the guest gets its name from its seed, and no host's resolver
            "etc/hostname": "localhost\n",
            "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
            "etc/resolv.conf": "",
        }
        rootfs.write_files(root, {path: (text.encode(), 0o644) for path, text in files.items()})
        for unit in MASKED_UNITS:
            link = os.path.join(root, "etc/systemd/system", unit)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink("/dev/null", link)
        for wanted in DISABLED_UNITS:
            link = os.path.join(root, "etc/systemd/system", wanted)
            if os.path.lexists(link):
                os.unlink(link)
        with open(os.path.join(root, "etc/machine-id"), "w"):  # each guest makes its own at first boot
            pass

    def _boot_files(self) -> Tuple[str, str]:
        boot = os.path.join(self.root, "boot")
        kernels = sorted(name for name in os.listdir(boot) if name.startswith("vmlinuz-"))
        if len(kernels) != 1:
            raise ImageBuildError(f"expected one kernel in the guest's /boot, found {kernels}")
        version = kernels[0][len("vmlinuz-"):]
        initrd = os.path.join(boot, f"initrd.img-{version}")
        if not os.path.isfile(initrd):
            raise ImageBuildError(f"the guest's kernel {version} has no initramfs")
        return os.path.join(boot, kernels[0]), initrd

    def _disk(self, raw: str, kernel: str, initrd: str) -> None:
        boot = os.path.join(self.work, "boot.raw")
        boot_size = _round_up(os.path.getsize(kernel) + os.path.getsize(initrd) + 16 * 1024**2, 1024**2)
        run(["mkfs.vfat", "-n", BOOT_LABEL, "-C", boot, str(boot_size // 1024)])
        config = os.path.join(self.work, "syslinux.cfg")
        with open(config, "w", encoding="ascii") as stream:
            stream.write(syslinux_cfg(CMDLINE))
        for source, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (config, "syslinux.cfg")):
            run(["mcopy", "-i", boot, source, "::" + name])
        run(["syslinux", "--install", boot])  # its boot sector and ldlinux.sys/.c32, through mtools
        ext4 = os.path.join(self.work, "root.raw")
        root_size = max(MIN_ROOT, _round_up(2 * rootfs.tree_size(self.root) + 256 * 1024**2, 1024**2))
        rootfs.make_ext4(self.root, ext4, root_size, label=ROOT_LABEL)
        with open(SYSLINUX_MBR, "rb") as stream:
            boot_code = stream.read(440)
        root_start = BOOT_START + boot_size
        table = partition_table(
            boot_code,
            [(0x0E, BOOT_START // SECTOR, boot_size // SECTOR, True),  # FAT16, LBA
             (0x83, root_start // SECTOR, root_size // SECTOR, False)],
            signature=int(self.key[:8], 16),
        )  # fmt: skip
        with open(raw, "wb") as disk:
            disk.write(table)
            disk.truncate(root_start + root_size)
            for source, offset in ((boot, BOOT_START), (ext4, root_start)):
                _copy_sparse(source, disk, offset)
                os.unlink(source)

    def _manifest(self, kernel: str) -> None:
        listing = rootfs.in_chroot(self.root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\n"])
        packages = dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)
        python = rootfs.in_chroot(self.root, ["python3", "-c", "import platform; print(platform.python_version())"])
        golden = os.path.join(self.out, GOLDEN)
        manifest = {
            "key": self.key,
            "sha256": sha256_of(golden),
            "kernel_version": os.path.basename(kernel)[len("vmlinuz-"):],
            "cmdline": CMDLINE,
            "python": python.strip(),
            "cloud_init": packages.get("cloud-init", "?"),
            "packages": packages,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.chmod(golden, 0o444)  # golden files are never written in place
        path = os.path.join(self.out, MANIFEST)
        with open(path, "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.chmod(path, 0o444)
        os.chmod(self.out, 0o755)


def _copy_sparse(source: str, disk, offset: int, block: int = 1024**2) -> None:
    """``source`` into the open file ``disk`` at ``offset``, leaving its zero blocks unwritten."""
    zero = bytes(block)
    with open(source, "rb") as stream:
        position = offset
        for chunk in iter(lambda: stream.read(block), b""):
            if chunk != zero[: len(chunk)]:
                disk.seek(position)
                disk.write(chunk)
            position += len(chunk)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
