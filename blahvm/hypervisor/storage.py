"""Clones of golden images, through libvirt's storage API, in one ``dir`` pool per host.

- ``clone_overlay``: a qcow2 volume whose ``<backingStore>`` is the golden: constant time whatever
  the golden's size; the guest writes into the overlay, the golden is never written.
- ``clone_copy``: a full copy (``createXMLFrom``) where copy-on-write is impossible.
- ``create_scratch``: an empty qcow2 disk of a requested size.
- ``create_seed``: a raw volume holding given bytes (a job's NoCloud seed), uploaded through libvirt.
- ``delete_volume`` (idempotent) and ``list_volumes``.

Volume names are checked with ``naming.check_safe_name`` (derive them with ``naming.disk_volume_name``
and friends), never taken from user text. Goldens must have passed ``images.verify_image`` first:
the clone functions take its ``ImageInfo``.
"""

from __future__ import annotations

import hashlib
import os
import time
import xml.etree.ElementTree as ET
from typing import Any, Optional, Tuple

import attrs

from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import LibvirtCallFailed, NotFound, StorageError, VolumeExists
from blahvm.hypervisor.images import ImageInfo
from blahvm.hypervisor.naming import check_safe_name

GOLDEN_POOL_PREFIX = "blahvm-images-"


@attrs.frozen
class VolumeInfo:
    name: str
    path: str
    capacity: int  # bytes the guest sees
    allocation: int  # bytes used on the host


def pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0711"  # QEMU's user may enter, not list
    return ET.tostring(pool, encoding="unicode")


def volume_xml(
    name: str, capacity: int, volume_format: str, backing: Optional[ImageInfo] = None
) -> str:
    volume = ET.Element("volume", type="file")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(int(capacity))
    ET.SubElement(volume, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type=volume_format)
    if volume_format == "qcow2":
        ET.SubElement(target, "compat").text = "1.1"  # qcow2 v3: zero clusters, lazy refcounts
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0600"
    if backing is not None:
        store = ET.SubElement(volume, "backingStore")
        ET.SubElement(store, "path").text = backing.path
        ET.SubElement(store, "format", type=backing.format)
    return ET.tostring(volume, encoding="unicode")


def _pool_path(conn: Connection, pool: Any) -> str:
    xml = conn.call("read pool XML", pool.XMLDesc, 0)
    return ET.fromstring(xml).findtext("target/path") or ""


def _ensure_pool(conn: Connection, name: str, path: str) -> Any:
    """The started, autostarting ``dir`` pool ``name`` at ``path``; defined and built if absent."""
    check_safe_name(name)
    path = os.path.normpath(path)
    if not os.path.isabs(path):
        raise StorageError(f"pool {name}: path {path!r} must be absolute")
    try:
        pool = conn.call(f"look up pool {name}", conn.raw.storagePoolLookupByName, name)
    except NotFound:
        try:
            pool = conn.call(f"define pool {name}", conn.raw.storagePoolDefineXML, pool_xml(name, path), 0)
        except LibvirtCallFailed:  # another prologue defined it a moment ago
            pool = conn.call(f"look up pool {name}", conn.raw.storagePoolLookupByName, name)
    actual = _pool_path(conn, pool)
    if os.path.normpath(actual) != path:
        raise StorageError(
            f"libvirt pool {name} exists at {actual}, the config says {path}: "
            f"fix hypervisor.pool_path or remove the pool (virsh pool-undefine {name})"
        )
    if not conn.call(f"check pool {name}", pool.isActive):
        try:
            conn.call(f"build pool {name}", pool.build, 0)  # creates the directory if missing
            conn.call(f"start pool {name}", pool.create, 0)
        except LibvirtCallFailed:
            if not conn.call(f"check pool {name}", pool.isActive):  # lost a race: fine if started
                raise
    conn.call(f"autostart pool {name}", pool.setAutostart, 1)
    return pool


UPLOAD_CHUNK = 256 * 1024
POOL_BUSY_WAIT = 10.0  # seconds a refresh waits out volumes being made by other prologues


def _refresh(conn: Connection, pool: Any, name: str) -> None:
    """Re-read the pool's directory; while another process is creating a volume in it libvirt
    refuses ("has asynchronous jobs running"), which only means: try again in a moment."""
    deadline = time.monotonic() + POOL_BUSY_WAIT
    while True:
        try:
            conn.call(f"refresh pool {name}", pool.refresh, 0)
            return
        except LibvirtCallFailed as error:
            if "asynchronous jobs running" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class ClonePool:
    """The host's clone pool. Build it with ``ClonePool.ensure(conn, name, path)``."""

    def __init__(self, conn: Connection, name: str, pool: Any) -> None:
        self.conn = conn
        self.name = name
        self._pool = pool

    @classmethod
    def ensure(cls, conn: Connection, name: str, path: str) -> "ClonePool":
        pool = _ensure_pool(conn, name, path)
        _refresh(conn, pool, name)
        return cls(conn, name, pool)

    @classmethod
    def find(cls, conn: Connection, name: str) -> "Optional[ClonePool]":
        """The pool if libvirt has it started, else None: for looking without making anything."""
        check_safe_name(name)
        try:
            pool = conn.call(f"look up pool {name}", conn.raw.storagePoolLookupByName, name)
        except NotFound:
            return None
        if not conn.call(f"check pool {name}", pool.isActive):
            return None
        _refresh(conn, pool, name)
        return cls(conn, name, pool)

    @property
    def path(self) -> str:
        return _pool_path(self.conn, self._pool)

    def _lookup(self, volume: str) -> Optional[Any]:
        try:
            return self.conn.call(f"look up volume {volume}", self._pool.storageVolLookupByName, volume)
        except NotFound:
            return None

    def _create(self, volume: str, xml: str, source: Any = None) -> str:
        check_safe_name(volume)
        if self._lookup(volume) is not None:
            raise VolumeExists(f"volume {volume} already exists in pool {self.name}: delete it first")
        if source is None:
            created = self.conn.call(f"create volume {volume}", self._pool.createXML, xml, 0)
        else:
            created = self.conn.call(f"copy into {volume}", self._pool.createXMLFrom, xml, source, 0)
        return self.conn.call(f"path of volume {volume}", created.path)

    def clone_overlay(self, golden: ImageInfo, volume: str) -> str:
        """A qcow2 overlay on ``golden``; returns the new volume's path."""
        return self._create(volume, volume_xml(volume, golden.virtual_size, "qcow2", golden))

    def clone_copy(self, golden: ImageInfo, volume: str) -> str:
        """A full copy of ``golden`` in its own format; returns the new volume's path."""
        source = self._golden_volume(golden)
        return self._create(volume, volume_xml(volume, golden.virtual_size, golden.format), source)

    def create_scratch(self, volume: str, size: int) -> str:
        """An empty, sparse qcow2 disk of ``size`` bytes; returns its path."""
        if size <= 0:
            raise StorageError(f"scratch volume {volume}: size must be positive, got {size}")
        return self._create(volume, volume_xml(volume, size, "qcow2"))

    def create_seed(self, volume: str, data: bytes) -> str:
        """A raw volume holding ``data``, root's and 0600 like every clone (libvirt gives it to QEMU's
        user while the guest runs); returns its path. libvirt writes it (an upload), so the bytes
        land in the file the pool names, never through a path blahvm opens. The test driver keeps
        no bytes: there the volume is made empty."""
        if not data:
            raise StorageError(f"seed volume {volume}: no data")
        path = self._create(volume, volume_xml(volume, len(data), "raw"))
        if self.conn.uri.startswith("test:"):
            return path
        created = self._lookup(volume)

        def upload() -> None:
            stream = self.conn.raw.newStream(0)
            try:
                created.upload(stream, 0, len(data), 0)
                view = memoryview(data)
                while view:
                    sent = stream.send(view[:UPLOAD_CHUNK].tobytes())
                    if sent <= 0:
                        raise StorageError(f"seed volume {volume}: the upload stopped")
                    view = view[sent:]
                stream.finish()
            except BaseException:
                try:
                    stream.abort()
                except Exception:  # the stream is broken already; the error that broke it counts
                    pass
                raise

        try:
            self.conn.call(f"upload into {volume}", upload)
        except BaseException:
            self.delete_volume(volume)
            raise
        return path

    def delete_volume(self, volume: str) -> bool:
        """Delete ``volume``; False when it was already gone."""
        check_safe_name(volume)
        found = self._lookup(volume)
        if found is None:
            return False
        try:
            self.conn.call(f"delete volume {volume}", found.delete, 0)
        except NotFound:
            return False
        return True

    def volume_path(self, volume: str) -> Optional[str]:
        found = self._lookup(check_safe_name(volume))
        return None if found is None else self.conn.call(f"path of volume {volume}", found.path)

    def list_volumes(self) -> Tuple[VolumeInfo, ...]:
        """Every volume in the pool (after a refresh, so files libvirt missed are seen too)."""

        _refresh(self.conn, self._pool, self.name)

        def listing() -> Tuple[VolumeInfo, ...]:
            volumes = []
            for volume in self._pool.listAllVolumes(0):
                _kind, capacity, allocation = volume.info()
                volumes.append(VolumeInfo(volume.name(), volume.path(), capacity, allocation))
            return tuple(sorted(volumes, key=lambda info: info.name))

        return self.conn.call(f"list volumes of pool {self.name}", listing)

    def _golden_volume(self, golden: ImageInfo) -> Any:
        """The golden as a libvirt volume, putting its directory in a pool of its own if needed."""
        try:
            return self.conn.call("look up golden", self.conn.raw.storageVolLookupByPath, golden.path)
        except NotFound:
            pass
        directory = os.path.dirname(os.path.abspath(golden.path))
        digest = hashlib.sha256(directory.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        pool = _ensure_pool(self.conn, GOLDEN_POOL_PREFIX + digest, directory)
        _refresh(self.conn, pool, GOLDEN_POOL_PREFIX + digest)
        return self.conn.call("look up golden", self.conn.raw.storageVolLookupByPath, golden.path)
