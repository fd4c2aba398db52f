"""Names blahvm gives to guests and volumes, derived from a job id and safe everywhere.

A job id is user-influenced (LSF array ids ``123[4]``, PBS ``123.server``, anything a harness passes),
so it never becomes a name as is: it is reduced to ``[A-Za-z0-9._]`` and a hash of the exact id is
appended, so two ids that sanitise alike still get different names. The hash also covers the
installation (its state dir), so two installations on one libvirtd (a test site beside production, two
clusters whose job ids both start at 1) never give their job 7 the same guest. The result is safe as a
libvirt domain name, a file name in the clone pool, a log field and a shell word.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Tuple

from blahvm.hypervisor.errors import SpecError

PREFIX = "blahvm-"
_KEEP = re.compile(r"[^A-Za-z0-9._]")
_MAX_READABLE = 32  # keeps names short enough for libvirt's per-domain socket and log paths
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def job_hash(job_id: str, installation: Optional[str] = None) -> str:
    """8 hex digits of sha256 over the exact id (surrogates included, so any str works), preceded by
    the installation's state dir and a NUL (which no path holds) when one is given."""
    text = job_id if installation is None else os.path.normpath(installation) + "\0" + job_id
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def guest_name(job_id: str, installation: Optional[str] = None) -> str:
    """``blahvm-<sanitised id>-<hash>``: the domain name of the guest that runs ``job_id`` for the
    installation whose state dir is ``installation``. Without one: the name blahvm gave before names
    carried their installation (``legacy_guest_name``), still recognised so an upgrade leaves no orphan."""
    if not job_id:
        raise SpecError("a job id is needed to name its guest, got an empty one")
    readable = _KEEP.sub("_", job_id)[:_MAX_READABLE]
    return f"{PREFIX}{readable}-{job_hash(job_id, installation)}"


def legacy_guest_name(job_id: str) -> str:
    """The name a guest of ``job_id`` got before names carried the installation (the hash of the id alone)."""
    return guest_name(job_id)


def guest_names(job_id: str, installation: str) -> Tuple[str, ...]:
    """Every name blahvm has given the guest of ``job_id`` in this installation: the current one first."""
    return (guest_name(job_id, installation), legacy_guest_name(job_id))


def guest_hostname(guest: str) -> str:
    """The hostname a guest gets: its name as one DNS label (letters, digits, '-'; at most 63)."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", guest)
    return label[:63].strip("-") or "blahvm"


def disk_volume_name(guest: str) -> str:
    """The clone volume that is the guest's root disk."""
    return check_safe_name(guest) + ".qcow2"


def scratch_volume_name(guest: str) -> str:
    """The guest's empty scratch disk."""
    return check_safe_name(guest) + "-scratch.qcow2"


def seed_volume_name(guest: str) -> str:
    """The guest's NoCloud seed (an ISO9660 image labelled cidata, blahvm.context)."""
    return check_safe_name(guest) + "-seed.iso"


def check_safe_name(name: str) -> str:
    """``name`` itself if it is safe as a domain, volume or file name; else a ``SpecError``."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise SpecError(
            f"{name!r} is not a safe guest or volume name "
            "(letters, digits, '.', '_', '-', starting with a letter or digit, at most 100)"
        )
    return name


def is_xml_text(text: str) -> bool:
    """Whether XML 1.0 can carry ``text`` as is (no NUL, no other C0 controls, no surrogates)."""
    return not _NOT_XML.search(text)


_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
