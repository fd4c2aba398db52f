"""Golden images are checked before first use, without handing them to ``qemu-img info``.

``qemu-img info`` follows what an image's header names (backing files, external data files, json:
URIs) and so reads host files on an untrusted image's say (OpenStack bug 2059809). blahvm reads the
qcow2 header itself and refuses any golden that names a backing file or an external data file, is
encrypted, damaged or uses unknown incompatible features. Raw and qcow2 are accepted.

A golden must be root's alone: a regular file (never a symlink: it is opened with O_NOFOLLOW, and
with O_NONBLOCK so a FIFO cannot hang the check), owned by root, not writable by group or others,
in directories only root can change (``blahvm.trust``). The checks, the header and the hash all
read the one file descriptor that was opened, so nothing can be swapped in between.

The sha256 is checked on first use and remembered per file identity (device, inode, size, mtime_ns,
ctime_ns) in ``<state_dir>/image-checksums.json``, so jobs do not re-hash gigabytes. ctime is in the
key because nobody can set it: whoever could write the file could restore its mtime after changing
it, but any write moves ctime. (libvirt no longer chowns goldens, which would move it too: the
domain XML names the golden as a backing store with ``relabel='no'``, see ``domain``.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import tempfile
from typing import BinaryIO, Iterator, Optional, Tuple

import attrs

from blahvm.hypervisor.errors import ImageError, ImageMissing
from blahvm.trust import directory_problem, status_problem

QCOW2_MAGIC = b"QFI\xfb"
EXT_END = 0x00000000
EXT_DATA_FILE = 0x44415441  # "DATA": the name of an external data file
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1 << 0, 1 << 1, 1 << 2
INCOMPAT_KNOWN = (1 << 5) - 1  # dirty, corrupt, data file, compression type, extended L2
CACHE_FILE = "image-checksums.json"
_V2_HEADER_LENGTH = 72
_MAX_CLUSTER_BITS = 21  # 2 MiB, as QEMU allows

# Other formats a "raw" file must not secretly be: QEMU would be told raw, and the guest get junk.
_OTHER_MAGICS = {
    b"QED\x00": "qed",
    b"KDMV": "vmdk",
    b"vhdxfile": "vhdx",
    b"LUKS\xba\xbe": "luks",
    b"conectix": "vpc",
}
_VDI_MAGIC_AT_0X40 = b"\x7f\x10\xda\xbe"


@attrs.frozen
class ImageInfo:
    """A golden image that passed the header check: its path, format and virtual disk size."""

    path: str
    format: str  # raw or qcow2
    virtual_size: int


@attrs.frozen
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    incompatible_features: int
    header_length: int
    extensions: Tuple[Tuple[int, bytes], ...]


class HeaderError(ValueError):
    """The bytes are not a qcow2 header blahvm can read."""


def parse_qcow2_header(data: bytes) -> Qcow2Header:
    """The qcow2 header (and its extensions) in ``data``, the first cluster of the file."""
    if len(data) < _V2_HEADER_LENGTH or data[:4] != QCOW2_MAGIC:
        raise HeaderError("not a qcow2 header")
    version, backing_offset, backing_size, cluster_bits, size, crypt = struct.unpack_from(
        ">IQIIQI", data, 4
    )
    if version not in (2, 3):
        raise HeaderError(f"qcow2 version {version} is not 2 or 3")
    if not 9 <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise HeaderError(f"cluster_bits {cluster_bits} is out of range")
    incompatible, header_length = 0, _V2_HEADER_LENGTH
    if version == 3:
        if len(data) < 104:
            raise HeaderError("the qcow2 v3 header is truncated")
        (incompatible,) = struct.unpack_from(">Q", data, 72)
        (header_length,) = struct.unpack_from(">I", data, 100)
        if header_length < 104 or header_length % 8:
            raise HeaderError(f"header_length {header_length} is invalid")
    end = min(len(data), 1 << cluster_bits)
    return Qcow2Header(
        version=version,
        backing_file_offset=backing_offset,
        backing_file_size=backing_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt,
        incompatible_features=incompatible,
        header_length=header_length,
        extensions=_extensions(data, header_length, end),
    )


def _extensions(data: bytes, offset: int, end: int) -> Tuple[Tuple[int, bytes], ...]:
    found = []
    while True:
        if offset + 8 > end:
            raise HeaderError("the header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == EXT_END:
            return tuple(found)
        if offset + 8 + length > end:
            raise HeaderError(f"header extension 0x{kind:08x} runs past the first cluster")
        found.append((kind, bytes(data[offset + 8 : offset + 8 + length])))
        offset += 8 + (length + 7) // 8 * 8


def qcow2_problem(header: Qcow2Header, backing_name: str = "") -> Optional[str]:
    """Why a golden with this header must not be used, or None when it is safe."""
    flatten = "flatten it on a trusted host (qemu-img convert -O qcow2 IN OUT) and re-import it"
    if header.backing_file_offset or header.backing_file_size:
        return f"its header names a backing file {backing_name!r}: {flatten}"
    data_files = [data for kind, data in header.extensions if kind == EXT_DATA_FILE]
    if data_files or header.incompatible_features & INCOMPAT_DATA_FILE:
        name = data_files[0].decode("utf-8", "replace") if data_files else ""
        return f"its header names an external data file {name!r}: {flatten}"
    if header.crypt_method:
        return "it is encrypted: import a decrypted copy"
    if header.incompatible_features & INCOMPAT_CORRUPT:
        return "it is marked corrupt: re-import a good copy"
    if header.incompatible_features & INCOMPAT_DIRTY:
        return "it was not closed cleanly (dirty): repair a copy with qemu-img check -r all and re-import it"
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        return f"it uses unknown incompatible qcow2 features 0x{unknown:x}: convert it with this host's qemu-img"
    return None


def inspect_image(name: str, path: str) -> ImageInfo:
    """Check the golden's place, owner and mode, then its header (never its backing chain: it must
    have none), and describe it."""
    with open_golden(name, path) as image, _read_errors(name, path):
        return _inspect_open(name, path, image)


_KEEP_GOLDENS = "keep a golden root's, mode 0444 or 0644, in directories only root can write (docs/images.md)"


@contextlib.contextmanager
def open_golden(name: str, path: str) -> Iterator[BinaryIO]:
    """The golden, open for reading, once it and every directory on its way are root's alone."""
    try:
        problem = directory_problem(os.path.dirname(path) or ".")
        if problem is not None:
            raise ImageError(f"image {name} at {path} is refused: {problem}: {_KEEP_GOLDENS}")
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-file.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageMissing(f"image {name} is missing on this host: expected it at {path}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageError(f"image {name} at {path} is refused: it is a symbolic link: name the file itself "
                             "in the site config") from None
        raise ImageError(f"image {name} at {path} cannot be read: {error.strerror}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ImageError(f"image {name} at {path} is not a regular file")
        problem = status_problem(status)
        if problem is not None:
            raise ImageError(f"image {name} at {path} is refused: it {problem}: {_KEEP_GOLDENS}")
        image = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with image:
        yield image


@contextlib.contextmanager
def _read_errors(name: str, path: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise ImageError(f"image {name} at {path} cannot be read: {error.strerror or error}") from None


def _inspect_open(name: str, path: str, image: BinaryIO) -> ImageInfo:
    status = os.fstat(image.fileno())
    start = image.read(104)
    if start[:4] != QCOW2_MAGIC:
        return _raw_info(name, path, start, image, status.st_size)
    cluster_bits = struct.unpack_from(">I", start, 20)[0] if len(start) >= 24 else 0
    image.seek(0)
    first_cluster = image.read(1 << min(max(cluster_bits, 9), _MAX_CLUSTER_BITS))
    try:
        header = parse_qcow2_header(first_cluster)
    except HeaderError as error:
        raise ImageError(f"image {name} at {path} has a damaged qcow2 header ({error}): re-import it") from None
    backing = ""
    if header.backing_file_offset and 0 < header.backing_file_size <= 1023:
        image.seek(header.backing_file_offset)
        backing = image.read(header.backing_file_size).decode("utf-8", "replace")
    problem = qcow2_problem(header, backing)
    if problem:
        raise ImageError(f"image {name} at {path} is refused: {problem}")
    return ImageInfo(path=path, format="qcow2", virtual_size=header.size)


def _raw_info(name: str, path: str, start: bytes, image, size: int) -> ImageInfo:
    for magic, other in _OTHER_MAGICS.items():
        if start.startswith(magic):
            raise ImageError(
                f"image {name} at {path} is a {other} image, not raw or qcow2: "
                "convert it with qemu-img convert -O qcow2 on a trusted host"
            )
    if start[0x40:0x44] == _VDI_MAGIC_AT_0X40:
        raise ImageError(f"image {name} at {path} is a vdi image, not raw or qcow2: convert it")
    if size == 0:
        raise ImageError(f"image {name} at {path} is empty: re-import it")
    return ImageInfo(path=path, format="raw", virtual_size=size)


# -- checksums -----------------------------------------------------------------------------------


def verify_image(name: str, path: str, sha256: Optional[str], state_dir: str) -> ImageInfo:
    """``inspect_image``, then the sha256 (if the environment gives one) of the same open file,
    remembered per file identity."""
    expected = None
    if sha256 is not None:
        expected = sha256.strip().lower()
        if len(expected) != 64 or not set(expected) <= set("0123456789abcdef"):
            raise ImageError(f"image {name}: the configured sha256 {sha256!r} is not 64 hex digits")
    with open_golden(name, path) as image, _read_errors(name, path):
        info = _inspect_open(name, path, image)
        if expected is None:
            return info
        key, identity = _identity(image)
        actual = _cached(state_dir, key, identity)
        if actual is None:
            actual = _hash(image)
            if _identity(image)[1] != identity:
                raise ImageError(f"image {name} at {path} changed while it was checked: retry once it is stable")
            try:
                _remember(state_dir, key, identity, actual)
            except OSError:
                pass  # only a cache: the next job hashes again

    if actual != expected:
        raise ImageError(
            f"image {name} failed its sha256 check (expected {expected[:12]}..., got {actual[:12]}...): "
            f"re-import it to {path} or correct the sha256 of environment {name} in the site config"
        )
    return info


def _identity(image: BinaryIO) -> Tuple[str, dict]:
    status = os.fstat(image.fileno())
    # ctime_ns: a writer can put the mtime back, never the ctime.
    return f"{status.st_dev}:{status.st_ino}", {
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "ctime_ns": status.st_ctime_ns,
    }


def _hash(image) -> str:
    digest = hashlib.sha256()
    image.seek(0)
    for chunk in iter(lambda: image.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _load(state_dir: str) -> dict:
    try:
        with open(os.path.join(state_dir, CACHE_FILE)) as cache:
            entries = json.load(cache)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):  # missing or damaged: it is only a cache, start afresh
        return {}


def _cached(state_dir: str, key: str, identity: dict) -> Optional[str]:
    entry = _load(state_dir).get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in identity.items()):
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) else None
    return None


def _remember(state_dir: str, key: str, identity: dict, digest: str) -> None:
    """Add one entry; concurrent prologues serialise on a lock file and replace atomically."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    with open(os.path.join(state_dir, CACHE_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _load(state_dir)
        entries[key] = dict(identity, sha256=digest)
        handle, temporary = tempfile.mkstemp(prefix=".image-checksums.", dir=state_dir)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(entries, out, indent=1, sort_keys=True)
            os.replace(temporary, os.path.join(state_dir, CACHE_FILE))
        except BaseException:
            os.unlink(temporary)
            raise
