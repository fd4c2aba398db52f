"""What a guest is made of, before it becomes domain XML: frozen values, checked on construction.

Paths and the kernel command line come from the site config or from blahvm itself; they are still
checked here (absolute, representable in XML, one line) so a bad value is a clear ``SpecError``
instead of a malformed domain.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from typing import Optional, Tuple

import attrs

from blahvm.hypervisor.errors import SpecError
from blahvm.hypervisor.metadata import GuestMetadata
from blahvm.hypervisor.naming import SAFE_NAME, check_safe_name, is_xml_text
from blahvm.model import FLAVOURS
from blahvm.quantities import Size

DISK_FORMATS = ("qcow2", "raw")
GUEST_DOMAIN_TYPES = ("kvm", "qemu")  # resolved: "auto" is decided before a spec is built
AGENT_PORT = "org.blahvm.agent.{}"
CONTROL_PORT = "org.blahvm.control"  # root's channel to the agent: whose job the guest runs
_SHARE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,35}\Z")  # virtiofs tags: at most 36 bytes


def _check_path(what: str, path: Optional[str]) -> None:
    if path is None:
        return
    if not isinstance(path, str) or not os.path.isabs(path):
        raise SpecError(f"{what} must be an absolute path, got {path!r}")
    if not is_xml_text(path) or "\n" in path or "\r" in path:
        raise SpecError(f"{what} {path!r} contains control characters")


def _check_line(what: str, text: Optional[str]) -> None:
    if text is not None and (not is_xml_text(text) or "\n" in text or "\r" in text):
        raise SpecError(f"{what} {text!r} must be one line of printable text")


@attrs.frozen
class BackingFile:
    """What is under an overlay: the golden (which has no backing file), or a frozen template disk
    over its golden (``backing``): the whole rest of the chain."""

    path: str
    format: str = "qcow2"
    backing: Optional["BackingFile"] = None

    def __attrs_post_init__(self) -> None:
        _check_path("backing file", self.path)
        if self.format not in DISK_FORMATS:
            raise SpecError(f"backing file format {self.format!r} is not one of {', '.join(DISK_FORMATS)}")
        if self.backing is not None and (self.format != "qcow2" or not isinstance(self.backing, BackingFile)):
            raise SpecError("only a qcow2 backing file has a backing file, given as a BackingFile")


@attrs.frozen
class DiskSpec:
    """A disk image file the guest sees, in the order given (first one boots)."""

    path: str
    format: str = "qcow2"
    readonly: bool = False
    backing: Optional[BackingFile] = None  # an overlay's golden, given to libvirt rather than probed

    def __attrs_post_init__(self) -> None:
        _check_path("disk path", self.path)
        if self.format not in DISK_FORMATS:
            raise SpecError(f"disk format {self.format!r} is not one of {', '.join(DISK_FORMATS)}")
        if self.backing is not None and (self.format != "qcow2" or not isinstance(self.backing, BackingFile)):
            raise SpecError("only a qcow2 disk has a backing file, given as a BackingFile")


@attrs.frozen
class SharedDir:
    """A host directory the guest mounts by ``tag`` (virtiofs; the kvm flavour only, for now)."""

    source: str
    tag: str
    binary: Optional[str] = None  # what libvirt runs instead of virtiofsd (blahvm's jail); None: its own

    def __attrs_post_init__(self) -> None:
        _check_path("shared directory", self.source)
        _check_path("virtiofsd binary", self.binary)
        if not isinstance(self.tag, str) or not _SHARE_TAG.match(self.tag):
            raise SpecError(f"share tag {self.tag!r} is not a plain name of at most 36 characters")


def guest_uuid(name: str) -> str:
    """A UUID fixed by the guest name, so re-running ``prepare`` redefines the same domain."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://blahvm.org/guest/" + name))


@attrs.frozen
class GuestSpec:
    """One guest: shape, disks, boot, agent channels, network and whose job it runs."""

    name: str
    uuid: str
    flavour: str  # one of blahvm.model.FLAVOURS
    memory: Size
    vcpus: int
    disks: Tuple[DiskSpec, ...]
    metadata: GuestMetadata
    seed: Optional[str] = None  # a NoCloud seed image (ISO9660), the last disk, read-only
    agent_sockets: Tuple[str, ...] = ()  # host-side UNIX sockets; port i is org.blahvm.agent.<i>
    control_socket: Optional[str] = None  # host end of org.blahvm.control: root's alone
    shares: Tuple[SharedDir, ...] = ()  # host directories the guest mounts by tag
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    bootloader: Optional[str] = None  # xen-pv: e.g. /usr/lib/xen-4.17/bin/pygrub
    network: Optional[str] = None  # a libvirt network name
    serial_log: Optional[str] = None  # kvm: file that receives the serial console; None: a pty
    domain_type: str = "qemu"  # kvm flavour only: kvm, or qemu where KVM cannot run guests
    arch: str = "x86_64"
    genid: bool = False  # a VM generation ID, new at every restore (guests made to be saved)
    # memory virtiofs can map without a share yet: a share hot-plugged after a restore needs it saved so
    shared_memory: bool = False

    def __attrs_post_init__(self) -> None:
        check_safe_name(self.name)
        try:
            uuidlib.UUID(self.uuid)
        except (ValueError, TypeError, AttributeError):
            raise SpecError(f"guest uuid {self.uuid!r} is not a UUID") from None
        if self.flavour not in FLAVOURS:
            raise SpecError(f"flavour {self.flavour!r} is not one of {', '.join(FLAVOURS)}")
        if not isinstance(self.memory, int) or self.memory < 1024**2:
            raise SpecError(f"guest memory {self.memory!r} is less than 1MiB")
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise SpecError(f"guest vcpus {self.vcpus!r} must be a whole number of at least 1")
        if not self.disks or not all(isinstance(disk, DiskSpec) for disk in self.disks):
            raise SpecError("a guest needs at least one DiskSpec")
        if self.domain_type not in GUEST_DOMAIN_TYPES:
            raise SpecError(
                f"domain type {self.domain_type!r} is not one of {', '.join(GUEST_DOMAIN_TYPES)}"
            )
        for path in self.agent_sockets:
            _check_path("agent socket", path)
        _check_path("control socket", self.control_socket)
        self._check_shares()
        for what in ("kernel", "initrd", "bootloader", "serial_log", "seed"):
            _check_path(what, getattr(self, what))
        _check_line("kernel command line", self.cmdline)
        if self.network is not None and not SAFE_NAME.match(self.network):
            raise SpecError(f"network name {self.network!r} is not a plain libvirt name")
        if self.arch not in ("x86_64", "i686", "aarch64"):
            raise SpecError(f"architecture {self.arch!r} is not supported")
        if self.kernel is None and (self.initrd or self.cmdline):
            raise SpecError("an initrd or kernel command line needs a kernel")
        if self.bootloader is not None and self.flavour != "xen-pv":
            raise SpecError("a bootloader (pygrub) is for the xen-pv flavour only")
        if self.bootloader is not None and self.kernel is not None:
            raise SpecError("give either a bootloader or a kernel, not both")

    def _check_shares(self) -> None:
        if not all(isinstance(share, SharedDir) for share in self.shares):
            raise SpecError("shares must be SharedDir values")
        tags = [share.tag for share in self.shares]
        if len(set(tags)) != len(tags):
            raise SpecError(f"share tags {tags} are not distinct")

    @property
    def agent_ports(self) -> Tuple[Tuple[str, str], ...]:
        """(port name, host socket) for each agent channel."""
        return tuple((AGENT_PORT.format(i), path) for i, path in enumerate(self.agent_sockets))

    @property
    def channels(self) -> Tuple[Tuple[str, str], ...]:
        """(port name, host socket) for every channel: the agent ports, then the control port."""
        control = () if self.control_socket is None else ((CONTROL_PORT, self.control_socket),)
        return self.agent_ports + control
