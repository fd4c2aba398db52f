"""Domain XML for a ``GuestSpec``, built with ElementTree (user text is only ever escaped text).

``build_domain_xml(spec)`` is pure: same spec, same bytes. What differs between KVM, Xen PV and
Xen HVM lives in ``flavours``; what every blahvm guest has is here: ACPI, every exit ends the
domain (``destroy``: a job's guest never reboots into a second life), disks, the shared
directories (the job's own), the agent channels, the optional job network, and the blahvm metadata
that says whose guest it is.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from blahvm.hypervisor.flavours import FLAVOURS, Flavour
from blahvm.hypervisor.metadata import GuestMetadata, metadata_element, read_metadata
from blahvm.hypervisor.spec import BackingFile, DiskSpec, GuestSpec, SharedDir, guest_uuid

__all__ = [
    "BackingFile",
    "DiskSpec",
    "GuestMetadata",
    "GuestSpec",
    "SharedDir",
    "build_domain_xml",
    "guest_uuid",
    "read_metadata",
]


def build_domain_xml(spec: GuestSpec) -> str:
    """The libvirt domain XML for ``spec``, indented, as text."""
    flavour = FLAVOURS[spec.flavour]
    domain = ET.Element("domain", type=flavour.domain_type(spec))
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = spec.uuid
    if spec.genid:
        ET.SubElement(domain, "genid")  # no value: libvirt makes one, and a new one at each restore
    ET.SubElement(domain, "metadata").append(metadata_element(spec.metadata))
    ET.SubElement(domain, "memory", unit="KiB").text = str(-(-int(spec.memory) // 1024))
    backing = flavour.memory_backing(spec)
    if backing is not None:
        domain.append(backing)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    bootloader = flavour.bootloader(spec)
    if bootloader is not None:
        ET.SubElement(domain, "bootloader").text = bootloader
    domain.append(flavour.os_element(spec))
    features = ET.SubElement(domain, "features")
    for feature in flavour.features:
        ET.SubElement(features, feature)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    domain.append(_devices(flavour, spec))
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _devices(flavour: Flavour, spec: GuestSpec) -> ET.Element:
    devices = ET.Element("devices")
    for index, disk in enumerate(spec.disks):
        devices.append(_disk(flavour, index, disk))
    if spec.seed is not None:
        devices.append(_seed(flavour, len(spec.disks), spec.seed))
    devices.extend(flavour.filesystem_elements(spec))
    if spec.network is not None:
        interface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(interface, "source", network=spec.network)
        model = flavour.interface_model()
        if model is not None:
            ET.SubElement(interface, "model", type=model)
    devices.extend(flavour.console_elements(spec))
    for port, socket_path in spec.channels:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=socket_path)
        ET.SubElement(channel, "target", type=flavour.channel_target, name=port)
    devices.extend(flavour.extra_devices(spec))
    return devices


def _backing_store(backing: BackingFile) -> ET.Element:
    """The overlay's whole chain, so libvirt neither probes it nor relabels the golden (nor a
    frozen template disk between the two).

    Without ``relabel='no'`` libvirt's DAC driver chowns every backing file to QEMU's user and,
    for anything below the top of a chain, never gives it back: QEMU's user could then write the
    golden every later guest boots from. The golden stays root's and world-readable instead;
    QEMU opens backing files read-only. The empty ``<backingStore/>`` ends the chain.
    """
    store = ET.Element("backingStore", type="file")
    ET.SubElement(store, "format", type=backing.format)
    source = ET.SubElement(store, "source", file=backing.path)
    ET.SubElement(source, "seclabel", model="dac", relabel="no")
    if backing.backing is not None:
        store.append(_backing_store(backing.backing))
    else:
        ET.SubElement(store, "backingStore")
    return store


def _disk(flavour: Flavour, index: int, disk: DiskSpec) -> ET.Element:
    element = ET.Element("disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=disk.format)
    ET.SubElement(element, "source", file=disk.path)
    if disk.backing is not None:
        element.append(_backing_store(disk.backing))
    dev, bus = flavour.disk_target(index)
    ET.SubElement(element, "target", dev=dev, bus=bus)
    if disk.readonly:
        ET.SubElement(element, "readonly")
    return element


def _seed(flavour: Flavour, disks: int, path: str) -> ET.Element:
    """The job's NoCloud seed, the disk after the others, read-only: cloud-init finds it by its
    label (cidata) on any block device. A disk on the flavour's own bus, not a cdrom: a stock
    cloud kernel has the driver of the disk it boots from (virtio-blk on KVM), but Debian's
    cloud kernel has no AHCI (no SATA cdrom), and IDE exists only on i440fx machines."""
    element = ET.Element("disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type="raw")
    ET.SubElement(element, "source", file=path)
    dev, bus = flavour.disk_target(disks)
    ET.SubElement(element, "target", dev=dev, bus=bus)
    ET.SubElement(element, "readonly")
    return element
