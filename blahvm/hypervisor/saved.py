"""Saved guest states: save a running guest to a file, and start another guest from it.

libvirt's save file (``virsh save``) is a header, the domain XML and QEMU's migration stream:

    virQEMUSaveHeader: magic "LibvirtQemudSave", then uint32 version, data_len, was_running,
    compressed, cookieOffset, unused[14] (host byte order, 92 bytes); data_len bytes of XML, NUL, cookie, NUL
    padding; then the stream QEMU reads from the same descriptor.

``virDomainRestoreFlags`` with a replacement XML refuses any other name or UUID (the ABI check), so
one state cannot start two guests. The XML in the header itself is not checked against anything: it
is parsed as the domain to start. ``write_job_state`` therefore writes a file of the job's own: the
header with the job's domain XML, then the template's stream. The job's XML is the template's as
libvirt saved it (machine type, addresses and aliases exactly as the stream expects), with only the
name, UUID, metadata, disk files and channel sockets changed (``job_definition``).

A restore regenerates the VM generation ID of a domain that has ``<genid/>`` (libvirt passes
``VIR_QEMU_PROCESS_START_GEN_VMID``), which Linux 5.18+ takes as a cue to reseed its generator.
"""

from __future__ import annotations

import contextlib
import os
import struct
import xml.etree.ElementTree as ET
from typing import Optional, Tuple

import attrs

from blahvm.hypervisor.connection import Connection, libvirt
from blahvm.hypervisor.domain import BackingFile, _backing_store
from blahvm.hypervisor.errors import HypervisorError, SpecError
from blahvm.hypervisor.metadata import GuestMetadata, metadata_element
from blahvm.hypervisor.naming import check_safe_name

MAGIC = b"LibvirtQemudSave"
PARTIAL = b"LibvirtQemudPart"  # libvirt's mark while a save is being written
_HEADER = struct.Struct("=16s5I14I")  # magic, version, data_len, was_running, compressed, cookieOffset, unused[14]: 92 bytes
VERSION = 2
RAW = 0  # "compressed": 0 is the raw format
PADDING = 64 * 1024  # what libvirt leaves after the XML, so it can be edited in place
_COPY_CHUNK = 8 * 1024**2


class SavedStateError(HypervisorError):
    """A saved state that cannot be used: missing, incomplete, damaged or of a format not written here."""


@attrs.frozen
class SaveHeader:
    """What precedes QEMU's stream in a save file."""

    version: int
    was_running: bool
    compressed: int
    xml: str
    cookie: Optional[str]
    stream_offset: int  # where QEMU's stream starts

    def encode(self, xml: Optional[str] = None) -> bytes:
        """The header, XML and cookie for ``xml`` (this header's own by default), padded as libvirt does."""
        xml_bytes = (self.xml if xml is None else xml).encode("utf-8") + b"\0"
        cookie = b"" if self.cookie is None else self.cookie.encode("utf-8") + b"\0"
        data_len = len(xml_bytes) + len(cookie) + PADDING
        unused = (0,) * 14
        header = _HEADER.pack(MAGIC, self.version, data_len, int(self.was_running), self.compressed,
                              len(xml_bytes) if cookie else 0, *unused)
        return header + xml_bytes + cookie + b"\0" * PADDING


def read_header(path: str) -> SaveHeader:
    """The header of the save file ``path``; SavedStateError if it is not a complete raw save of ours."""
    try:
        with open(path, "rb") as file:
            fixed = file.read(_HEADER.size)
            if len(fixed) < _HEADER.size:
                raise SavedStateError(f"saved state {path} is truncated (no header)")
            magic, version, data_len, was_running, compressed, cookie_offset, *_unused = _HEADER.unpack(fixed)
            if magic == PARTIAL:
                raise SavedStateError(f"saved state {path} is incomplete: its save did not finish")
            if magic != MAGIC:
                raise SavedStateError(f"saved state {path} is not a libvirt save file")
            if version != VERSION or compressed != RAW:
                raise SavedStateError(f"saved state {path} has version {version}, format {compressed}: "
                                      f"only version {VERSION}, raw, is used here")
            if not 0 < data_len <= 16 * 1024**2 or cookie_offset > data_len:
                raise SavedStateError(f"saved state {path} has a damaged header")
            data = file.read(data_len)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        raise SavedStateError(f"saved state {path} is missing") from None
    except OSError as error:
        raise SavedStateError(f"saved state {path} cannot be read: {error.strerror or error}") from None
    if len(data) < data_len:
        raise SavedStateError(f"saved state {path} is truncated (in its XML)")
    xml_end = cookie_offset or data_len
    xml = data[:xml_end].split(b"\0", 1)[0].decode("utf-8", "replace")
    cookie = data[cookie_offset:].split(b"\0", 1)[0].decode("utf-8", "replace") if cookie_offset else None
    offset = _HEADER.size + data_len
    if size <= offset:
        raise SavedStateError(f"saved state {path} is truncated (no memory state)")
    return SaveHeader(version, bool(was_running), compressed, xml, cookie, offset)


def save(conn: Connection, name: str, path: str) -> None:
    """Save the running guest ``name`` to ``path`` and stop it (libvirt writes the file as root)."""
    check_safe_name(name)
    domain = conn.call(f"look up {name}", conn.raw.lookupByName, name)
    conn.call(f"save {name}", domain.saveFlags, path, None, libvirt().VIR_DOMAIN_SAVE_RUNNING)


def write_job_state(template: str, header: SaveHeader, xml: str, path: str, expected_size: int) -> None:
    """The file ``path`` (new, root's, 0600): ``header`` with the job's domain ``xml``, then the
    template's stream. ``expected_size`` is the template's recorded size: a file that shrank or grew
    since it was made is refused, not half copied."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(template, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        if size != expected_size:
            raise SavedStateError(f"saved state {template} is {size} bytes, {expected_size} were recorded")
        fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, header.encode(xml))
            _copy(source.fileno(), header.stream_offset, fd, size - header.stream_offset)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)


def _copy(source: int, offset: int, target: int, length: int) -> None:
    """``length`` bytes from ``source`` at ``offset`` to the end of ``target``, in the kernel."""
    done = 0
    while done < length:
        try:
            copied = os.copy_file_range(source, target, min(_COPY_CHUNK, length - done), offset + done)
        except OSError:
            copied = os.sendfile(target, source, offset + done, min(_COPY_CHUNK, length - done))
        if copied <= 0:
            raise SavedStateError("saved state: the template's stream ended early")
        done += copied


def restore(conn: Connection, path: str) -> str:
    """Start the guest saved in ``path`` (running); returns its name. libvirt keeps it transient."""
    header = read_header(path)
    name = check_safe_name(ET.fromstring(header.xml).findtext("name") or "")
    conn.call(f"restore {name}", conn.raw.restoreFlags, path, None, libvirt().VIR_DOMAIN_SAVE_RUNNING)
    return name


@attrs.frozen
class JobDisk:
    """One of the job's disks in place of the template's disk at the same position."""

    path: str
    backing: Optional[BackingFile] = None  # None: an empty disk of its own (a scratch disk)


def job_definition(saved_xml: str, name: str, uuid: str, metadata: GuestMetadata, disks: Tuple[JobDisk, ...],
                   sockets: Tuple[Tuple[str, str], ...]) -> str:
    """The template's saved XML made the job's: its name, UUID and metadata, ``disks`` in the order
    of the template's, and each channel's socket from ``sockets`` ((port name, path)). Everything
    QEMU's stream depends on (devices, addresses, machine) is left as saved."""
    try:
        domain = ET.fromstring(saved_xml)
    except ET.ParseError as error:
        raise SavedStateError(f"the saved state's domain XML does not parse: {error}") from None
    check_safe_name(name)
    _set_text(domain, "name", name)
    _set_text(domain, "uuid", uuid)
    old = domain.find("metadata")
    if old is not None:
        domain.remove(old)
    element = ET.Element("metadata")
    element.append(metadata_element(metadata))
    domain.insert(2, element)
    devices = domain.find("devices")
    if devices is None:
        raise SavedStateError("the saved state's domain has no devices")
    _replace_disks(devices, disks)
    _replace_sockets(devices, dict(sockets))
    for serial in devices.findall("serial") + devices.findall("console"):
        source = serial.find("source")  # a pty's path is the old guest's: the new one gets its own
        if serial.get("type") == "pty" and source is not None:
            serial.remove(source)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _set_text(domain: ET.Element, tag: str, text: str) -> None:
    element = domain.find(tag)
    if element is None:
        raise SavedStateError(f"the saved state's domain has no <{tag}>")
    element.text = text


def _replace_disks(devices: ET.Element, disks: Tuple[JobDisk, ...]) -> None:
    found = [disk for disk in devices.findall("disk") if disk.get("device") == "disk"]
    if len(found) != len(disks):
        raise SpecError(f"the saved state has {len(found)} disks, the job {len(disks)}")
    for element, disk in zip(found, disks):
        for child in element.findall("source") + element.findall("backingStore"):
            element.remove(child)
        source = ET.Element("source", file=disk.path)
        at = list(element).index(element.find("driver")) + 1 if element.find("driver") is not None else 0
        element.insert(at, source)
        if disk.backing is not None:
            element.insert(at + 1, _backing_store(disk.backing))


def _replace_sockets(devices: ET.Element, sockets: dict) -> None:
    channels = devices.findall("channel")
    names = [channel.find("target").get("name") for channel in channels if channel.find("target") is not None]
    if sorted(names) != sorted(sockets):
        raise SpecError(f"the saved state's channels {sorted(names)} are not the job's {sorted(sockets)}")
    for channel in channels:
        channel.find("source").set("path", sockets[channel.find("target").get("name")])
