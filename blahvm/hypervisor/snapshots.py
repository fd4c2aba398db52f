"""Static guests: domains the site defined, which blahvm leases but never undefines.

A static guest is returned clean by reverting it to its snapshot ``blahvm-clean`` (made once by the
site, of the shut-off guest). While leased, its agent channel points into the job's run dir, so the
job's socket is where ``launch`` looks for every guest; the revert restores the site's definition.
Every call is bounded by the connection's timeout.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Optional

from blahvm.hypervisor.connection import Connection, libvirt
from blahvm.hypervisor.errors import HypervisorError, LibvirtCallFailed, NotFound
from blahvm.hypervisor.naming import check_safe_name
from blahvm.hypervisor.spec import AGENT_PORT, CONTROL_PORT

CLEAN_SNAPSHOT = "blahvm-clean"
AGENT_CHANNEL = AGENT_PORT.format(0)


class NotLeasable(HypervisorError):
    """The site's guest cannot be leased as defined: a fault of this host, not of the job."""


def _domain(conn: Connection, name: str) -> Any:
    check_safe_name(name)
    return conn.call(f"look up {name}", conn.raw.lookupByName, name)


def exists(conn: Connection, name: str) -> bool:
    try:
        _domain(conn, name)
    except NotFound:
        return False
    return True


def has_snapshot(conn: Connection, name: str, snapshot: str = CLEAN_SNAPSHOT) -> bool:
    domain = _domain(conn, name)
    return snapshot in conn.call(f"list snapshots of {name}", domain.snapshotListNames, 0)


def lease_problem(conn: Connection, name: str) -> Optional[str]:
    """Why the site's guest ``name`` cannot be leased (one line), or None if it can."""
    if not exists(conn, name):
        return f"static guest {name} is not defined in libvirt on this host"
    if not has_snapshot(conn, name):
        return (
            f"static guest {name} has no snapshot {CLEAN_SNAPSHOT!r}: shut it off and run "
            f"'virsh snapshot-create-as {name} {CLEAN_SNAPSHOT}'"
        )
    if agent_socket(definition(conn, name)) is None:
        return _no_channel(name)
    return None


def _no_channel(name: str) -> str:
    return (
        f"static guest {name} has no <channel type='unix'> with <target type='virtio' "
        f"name='{AGENT_CHANNEL}'/> (type='xen' on Xen): add one to its definition"
    )


def stop(conn: Connection, name: str) -> bool:
    """Power the guest off at once, keeping it defined; False when it was not running."""
    domain = _domain(conn, name)
    if not conn.call(f"check {name}", domain.isActive):
        return False
    try:
        conn.call(f"destroy {name}", domain.destroy)
    except LibvirtCallFailed:
        if conn.call(f"check {name}", domain.isActive):  # else it stopped on its own meanwhile
            raise
    return True


def revert_clean(conn: Connection, name: str) -> None:
    """Revert the (stopped) guest to ``blahvm-clean``: its disks and its definition as the site made them."""
    domain = _domain(conn, name)

    def revert() -> None:
        snapshot = domain.snapshotLookupByName(CLEAN_SNAPSHOT, 0)
        domain.revertToSnapshot(snapshot, 0)

    conn.call(f"revert {name} to {CLEAN_SNAPSHOT}", revert)


def point_agent_at(conn: Connection, name: str, socket_path: str, control_path: str) -> None:
    """Redefine the guest with its agent channel's host end at ``socket_path`` and a control
    channel's at ``control_path``."""
    domain = _domain(conn, name)
    module = libvirt()
    flags = module.VIR_DOMAIN_XML_INACTIVE | module.VIR_DOMAIN_XML_SECURE  # keep the site's whole definition
    xml = conn.call(f"read {name}", domain.XMLDesc, flags)
    rewritten = with_agent_socket(xml, name, socket_path, control_path)
    conn.call(f"redefine {name}", conn.raw.defineXMLFlags, rewritten, module.VIR_DOMAIN_DEFINE_VALIDATE)


def with_agent_socket(xml: str, name: str, socket_path: str, control_path: Optional[str] = None) -> str:
    """``xml`` with the unix channel ``org.blahvm.agent.0`` bound at ``socket_path``, and, given
    ``control_path``, a channel ``org.blahvm.control`` of the same kind bound there (pure)."""
    root = ET.fromstring(xml)
    channel = _agent_channel(root)
    if channel is None:
        raise NotLeasable(_no_channel(name))
    _bind_source(channel, socket_path)
    if control_path is not None:
        control = _channel(root, CONTROL_PORT)
        if control is None:  # the site need not define it: blahvm adds it beside the agent's
            control = ET.SubElement(root.find("devices"), "channel", type="unix")
            ET.SubElement(control, "target", type=channel.find("target").get("type", "virtio"), name=CONTROL_PORT)
        _bind_source(control, control_path)
    return ET.tostring(root, encoding="unicode")


def _bind_source(channel: ET.Element, socket_path: str) -> None:
    source = channel.find("source")
    if source is None:
        source = ET.Element("source")
        channel.insert(0, source)
    source.attrib.clear()
    source.set("mode", "bind")
    source.set("path", socket_path)


def agent_socket(xml: str) -> Optional[str]:
    """Where the domain's agent channel is bound, if it has one."""
    channel = _agent_channel(ET.fromstring(xml))
    source = None if channel is None else channel.find("source")
    return None if source is None else source.get("path")


def _agent_channel(root: ET.Element) -> Optional[ET.Element]:
    return _channel(root, AGENT_CHANNEL)


def _channel(root: ET.Element, port: str) -> Optional[ET.Element]:
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        if channel.get("type") == "unix" and target is not None and target.get("name") == port:
            return channel
    return None


def start(conn: Connection, name: str) -> None:
    domain = _domain(conn, name)
    conn.call(f"start {name}", domain.create)


def definition(conn: Connection, name: str) -> str:
    domain = _domain(conn, name)
    return conn.call(f"read {name}", domain.XMLDesc, libvirt().VIR_DOMAIN_XML_INACTIVE)
