"""One class per guest flavour, one contract: what differs between KVM, Xen PV and Xen HVM guests.

``domain.build_domain_xml`` asks the flavour registered under ``spec.flavour`` for the parts that
differ (domain type, ``<os>``, memory backing, disk targets, shared directories, console, channel
target, network model, extra devices) and assembles the rest the same way for every flavour.
A new flavour is a new class in ``FLAVOURS``, not another branch in the builder.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import List, Mapping, Optional, Tuple

from blahvm.hypervisor.errors import SpecError
from blahvm.hypervisor.spec import GuestSpec, SharedDir

XEN_HVMLOADER = "/usr/lib/xen/boot/hvmloader"


def _direct_kernel(os_element: ET.Element, spec: GuestSpec) -> None:
    for tag in ("kernel", "initrd", "cmdline"):
        value = getattr(spec, tag)
        if value is not None:
            ET.SubElement(os_element, tag).text = value


class Flavour:
    """The contract every flavour fulfils. Subclasses override what differs."""

    name = ""
    channel_target = "virtio"  # <channel><target type=...>
    features: Tuple[str, ...] = ("acpi",)  # acpi always: without it a guest's poweroff never stops it

    def domain_type(self, spec: GuestSpec) -> str:
        raise NotImplementedError

    def bootloader(self, spec: GuestSpec) -> Optional[str]:
        return None

    def os_element(self, spec: GuestSpec) -> ET.Element:
        raise NotImplementedError

    def disk_target(self, index: int) -> Tuple[str, str]:
        """(dev, bus) of the index-th disk."""
        raise NotImplementedError

    def interface_model(self) -> Optional[str]:
        return None

    def console_elements(self, spec: GuestSpec) -> List[ET.Element]:
        raise NotImplementedError

    def extra_devices(self, spec: GuestSpec) -> List[ET.Element]:
        return []

    def memory_backing(self, spec: GuestSpec) -> Optional[ET.Element]:
        return None

    def filesystem_elements(self, spec: GuestSpec) -> List[ET.Element]:
        """One device per shared directory; flavours that cannot share refuse any."""
        return [self.filesystem_element(share) for share in spec.shares]

    def filesystem_element(self, share: SharedDir) -> ET.Element:
        """The device of one shared directory (also what is hot-plugged into a running guest)."""
        raise SpecError(f"a {self.name} guest cannot share a host directory yet (virtiofs is for the kvm flavour only)")


class Kvm(Flavour):
    """KVM, or QEMU's TCG where KVM cannot run guests (``spec.domain_type``)."""

    name = "kvm"

    def domain_type(self, spec: GuestSpec) -> str:
        return spec.domain_type

    def os_element(self, spec: GuestSpec) -> ET.Element:
        os_element = ET.Element("os")
        ET.SubElement(os_element, "type", arch=spec.arch).text = "hvm"
        _direct_kernel(os_element, spec)
        if spec.kernel is None:
            ET.SubElement(os_element, "boot", dev="hd")
        return os_element

    def disk_target(self, index: int) -> Tuple[str, str]:
        return "vd" + _disk_letter(index), "virtio"

    def interface_model(self) -> Optional[str]:
        return "virtio"

    def console_elements(self, spec: GuestSpec) -> List[ET.Element]:
        # A file in the job's run dir keeps the boot log after the guest is gone, with no reader
        # needed while it runs; a pty is the fallback when no log path is given.
        if spec.serial_log is not None:
            serial = ET.Element("serial", type="file")
            ET.SubElement(serial, "source", path=spec.serial_log)
        else:
            serial = ET.Element("serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        return [serial]

    def memory_backing(self, spec: GuestSpec) -> Optional[ET.Element]:
        # virtiofsd maps the guest's RAM to serve it: memory must be a shareable memfd.
        if not spec.shares and not spec.shared_memory:
            return None
        backing = ET.Element("memoryBacking")
        ET.SubElement(backing, "source", type="memfd")
        ET.SubElement(backing, "access", mode="shared")
        return backing

    def filesystem_element(self, share: SharedDir) -> ET.Element:
        # passthrough: virtiofsd acts with the credentials of the guest process that asks, within
        # what the binary that libvirt runs for it allows (blahvm.jobshare.jail: the job's ids alone).
        filesystem = ET.Element("filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(filesystem, "driver", type="virtiofs")
        if share.binary is not None:
            ET.SubElement(filesystem, "binary", path=share.binary)
        ET.SubElement(filesystem, "source", dir=share.source)
        ET.SubElement(filesystem, "target", dir=share.tag)
        return filesystem

    def extra_devices(self, spec: GuestSpec) -> List[ET.Element]:
        # No balloon: the guest's memory is its slot's, and the driver only costs boot time.
        return [ET.Element("memballoon", model="none")]


class XenPv(Flavour):
    """Xen paravirtual: pygrub or a direct kernel, xvd* disks on the xen bus, the xen console."""

    name = "xen-pv"
    channel_target = "xen"

    def domain_type(self, spec: GuestSpec) -> str:
        return "xen"

    def bootloader(self, spec: GuestSpec) -> Optional[str]:
        return spec.bootloader

    def os_element(self, spec: GuestSpec) -> ET.Element:
        os_element = ET.Element("os")
        ET.SubElement(os_element, "type", arch=spec.arch, machine="xenpv").text = "linux"
        _direct_kernel(os_element, spec)
        return os_element

    def disk_target(self, index: int) -> Tuple[str, str]:
        return "xvd" + _disk_letter(index), "xen"

    def console_elements(self, spec: GuestSpec) -> List[ET.Element]:
        console = ET.Element("console", type="pty")
        ET.SubElement(console, "target", type="xen", port="0")
        return [console]


class XenHvm(Flavour):
    """Xen fully virtualised: hvmloader firmware, IDE disks, a serial console."""

    name = "xen-hvm"
    channel_target = "xen"
    features = ("acpi", "apic", "pae")

    def domain_type(self, spec: GuestSpec) -> str:
        return "xen"

    def os_element(self, spec: GuestSpec) -> ET.Element:
        os_element = ET.Element("os")
        ET.SubElement(os_element, "type", arch=spec.arch, machine="xenfv").text = "hvm"
        ET.SubElement(os_element, "loader", type="rom").text = XEN_HVMLOADER
        _direct_kernel(os_element, spec)
        if spec.kernel is None:
            ET.SubElement(os_element, "boot", dev="hd")
        return os_element

    def disk_target(self, index: int) -> Tuple[str, str]:
        if index >= 4:
            raise SpecError("a xen-hvm guest has IDE disks: at most 4")
        return "hd" + _disk_letter(index), "ide"

    def console_elements(self, spec: GuestSpec) -> List[ET.Element]:
        serial = ET.Element("serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        console = ET.Element("console", type="pty")
        ET.SubElement(console, "target", type="serial", port="0")
        return [serial, console]


def _disk_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise SpecError(f"a guest can have at most 26 disks, not {index + 1}")
    return "abcdefghijklmnopqrstuvwxyz"[index]


FLAVOURS: Mapping[str, Flavour] = {flavour.name: flavour for flavour in (Kvm(), XenPv(), XenHvm())}
