"""Devices added to a running guest: the job's shared directory, after a restore.

QEMU 7.2's vhost-user-fs device cannot be saved (its vmstate is ``unmigratable``), so a guest
restored from a saved state never has one. libvirt 9.0 hot-plugs it (``qemuDomainAttachFSDevice``:
it starts the ``<binary>`` it is given, as at a boot, then ``device_add``s a vhost-user-fs-pci on
the guest's PCI bus), provided the guest's memory is a shared memfd, which it must then have been
saved with (``GuestSpec.shared_memory``). The guest learns of the device through ACPI PCI hotplug;
mounting it is the guest's business (``blahvm.guest.control.mount``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from blahvm.hypervisor.connection import Connection, libvirt
from blahvm.hypervisor.flavours import FLAVOURS
from blahvm.hypervisor.naming import check_safe_name
from blahvm.hypervisor.spec import SharedDir


def share_xml(flavour: str, share: SharedDir) -> str:
    """The ``<filesystem>`` device of ``share``, exactly as a boot would have it."""
    return ET.tostring(FLAVOURS[flavour].filesystem_element(share), encoding="unicode")


def attach_share(conn: Connection, name: str, flavour: str, share: SharedDir) -> None:
    """Hot-plug ``share`` into the running guest ``name`` (live only: the guest is transient)."""
    check_safe_name(name)
    xml = share_xml(flavour, share)
    domain = conn.call(f"look up {name}", conn.raw.lookupByName, name)
    conn.call(f"attach the shared directory to {name}", domain.attachDeviceFlags, xml,
              libvirt().VIR_DOMAIN_AFFECT_LIVE)
