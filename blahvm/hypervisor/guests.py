"""Define, start, stop and list blahvm's guests; every libvirt call bounded by the connection.

The lifecycle layer composes these with ``storage`` and its ledger:
``define_and_start`` in ``prepare``, ``destroy_and_undefine`` in ``teardown`` (idempotent: a guest
that is already gone is fine), ``list_blahvm_guests`` in ``reap`` (only domains whose blahvm
metadata can be read are listed: ``reap`` must never touch a guest it cannot prove is its own).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any, Optional, Tuple

import attrs

from blahvm.hypervisor.connection import Connection, libvirt
from blahvm.hypervisor.errors import (
    DefinitionRejected,
    HypervisorError,
    LibvirtCallFailed,
    MetadataError,
    NotFound,
    SpecError,
)
from blahvm.hypervisor.metadata import GuestMetadata, read_metadata
from blahvm.hypervisor.naming import check_safe_name

_STATE_NAMES = {
    "VIR_DOMAIN_NOSTATE": "nostate",
    "VIR_DOMAIN_RUNNING": "running",
    "VIR_DOMAIN_BLOCKED": "blocked",
    "VIR_DOMAIN_PAUSED": "paused",
    "VIR_DOMAIN_SHUTDOWN": "shutting-down",
    "VIR_DOMAIN_SHUTOFF": "shutoff",
    "VIR_DOMAIN_CRASHED": "crashed",
    "VIR_DOMAIN_PMSUSPENDED": "suspended",
}
STOPPED_STATES = ("shutoff", "crashed")


@attrs.frozen
class GuestInfo:
    name: str
    metadata: GuestMetadata
    state: str  # running, paused, shutoff, ... (see _STATE_NAMES)


def state_name(code: int) -> str:
    module = libvirt()
    for constant, name in _STATE_NAMES.items():
        if getattr(module, constant) == code:
            return name
    return "unknown"


def _domain_name(xml: str) -> str:
    try:
        name = ET.fromstring(xml).findtext("name")
    except ET.ParseError as error:
        raise SpecError(f"domain XML does not parse: {error}") from None
    return check_safe_name(name or "")


def _lookup(conn: Connection, name: str) -> Optional[Any]:
    try:
        return conn.call(f"look up {name}", conn.raw.lookupByName, name)
    except NotFound:
        return None


def define_and_start(conn: Connection, xml: str) -> str:
    """Define the domain (schema-validated by libvirt) and start it; returns its name.

    Safe to re-run: a domain of that name that already runs is left running. If the start fails,
    the definition is removed again so no half-made guest is left behind.
    """
    name = _domain_name(xml)
    flags = libvirt().VIR_DOMAIN_DEFINE_VALIDATE
    domain = conn.call(f"define {name}", conn.raw.defineXMLFlags, xml, flags)
    if conn.call(f"check {name}", domain.isActive):
        return name
    try:
        conn.call(f"start {name}", domain.create)
    except (LibvirtCallFailed, DefinitionRejected):
        try:
            conn.call(f"undefine {name}", domain.undefine)
        except HypervisorError:
            pass  # teardown or reap removes it
        raise
    return name


def start_bound_to_connection(conn: Connection, xml: str) -> str:
    """Start a transient guest that libvirt destroys when ``conn`` closes, however its holder ends
    (``VIR_DOMAIN_START_AUTODESTROY``: a process killed with SIGKILL closes its connection too);
    returns its name. For guests that must never outlive the process that made them."""
    name = _domain_name(xml)
    module = libvirt()
    conn.call(f"start {name}", conn.raw.createXML, xml,
              module.VIR_DOMAIN_START_AUTODESTROY | module.VIR_DOMAIN_START_VALIDATE)
    return name


def destroy_and_undefine(conn: Connection, name: str) -> bool:
    """Stop the guest whatever it is doing and forget it; False when it was already gone."""
    check_safe_name(name)
    domain = _lookup(conn, name)
    if domain is None:
        return False
    module = libvirt()
    try:
        if conn.call(f"check {name}", domain.isActive):
            conn.call(f"destroy {name}", domain.destroy)
    except NotFound:  # a transient guest vanishes once destroyed
        return True
    except LibvirtCallFailed:
        # It may have stopped on its own between the check and the destroy.
        if conn.call(f"check {name}", domain.isActive):
            raise
    # No NVRAM flag: blahvm guests boot without UEFI variable stores.
    flags = module.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | module.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    try:
        conn.call(f"undefine {name}", domain.undefineFlags, flags)
    except NotFound:
        pass
    except LibvirtCallFailed:
        if _lookup(conn, name) is not None and conn.call(f"check {name}", domain.isPersistent):
            raise
    return True


def domain_state(conn: Connection, name: str) -> Optional[str]:
    """``running``, ``paused``, ``shutoff``, ...; None when no such domain exists."""
    check_safe_name(name)
    domain = _lookup(conn, name)
    if domain is None:
        return None
    try:
        state, _reason = conn.call(f"state of {name}", domain.state)
    except NotFound:
        return None
    return state_name(state)


def wait_until_stopped(conn: Connection, name: str, timeout: float, poll: float = 0.25) -> bool:
    """Wait up to ``timeout`` seconds for the guest to stop (or vanish); True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        state = domain_state(conn, name)
        if state is None or state in STOPPED_STATES:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def list_blahvm_guests(conn: Connection) -> Tuple[GuestInfo, ...]:
    """Every domain that carries readable blahvm metadata, with its state, sorted by name."""

    def listing() -> Tuple[GuestInfo, ...]:
        module = libvirt()
        guests = []
        for domain in conn.raw.listAllDomains(0):
            try:
                metadata = read_metadata(domain.XMLDesc(0))
                state, _reason = domain.state()
            except MetadataError:
                continue  # not provably ours: leave it alone
            except module.libvirtError as error:
                if error.get_error_code() == module.VIR_ERR_NO_DOMAIN:
                    continue  # vanished while we looked
                raise
            if metadata is not None:
                guests.append(GuestInfo(domain.name(), metadata, state_name(state)))
        return tuple(sorted(guests, key=lambda guest: guest.name))

    return conn.call("list guests", listing)


def guest_metadata(conn: Connection, name: str) -> Optional[GuestMetadata]:
    """The blahvm metadata of the domain ``name``; None when there is no such domain or it carries none.
    ``MetadataError`` when it carries blahvm metadata that cannot be read."""
    check_safe_name(name)
    domain = _lookup(conn, name)
    if domain is None:
        return None
    try:
        xml = conn.call(f"describe {name}", domain.XMLDesc, 0)
    except NotFound:
        return None
    return read_metadata(xml)
