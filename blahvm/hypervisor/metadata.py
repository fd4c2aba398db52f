"""blahvm's own ``<metadata>`` in a domain: whose guest it is, so ``reap`` can decide about it.

Written as ``<blahvm:job xmlns:blahvm="https://blahvm.org/xmlns/job/1">`` with one child per field.
Values are user text (job id, user, job name), so they go in as ElementTree text, never formatted.
A value XML cannot carry exactly (control characters, ``\\r``, which parsers turn into ``\\n``, or
leading/trailing blanks, which libvirt's parser may drop) is stored base64-encoded with
``encoding="base64"``: the metadata round-trips exactly for any string.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import xml.etree.ElementTree as ET
from typing import Optional

import attrs

from blahvm.hypervisor.errors import MetadataError
from blahvm.hypervisor.naming import is_xml_text

NAMESPACE = "https://blahvm.org/xmlns/job/1"
PREFIX = "blahvm"
ET.register_namespace(PREFIX, NAMESPACE)

_REQUIRED = ("id", "user", "environment", "host", "created")
_OPTIONAL = ("vo", "name", "ledger")


@attrs.frozen
class GuestMetadata:
    """Who a guest belongs to. ``created`` is whole seconds since the epoch (UTC)."""

    job_id: str
    user: str
    environment: str
    host: str
    created: int
    vo: Optional[str] = None
    name: Optional[str] = None  # the job's name, shown only
    ledger: Optional[str] = None  # the state dir of the installation that made it: only its reap may remove it


def _tag(field: str) -> str:
    return f"{{{NAMESPACE}}}{field}"


def _plain(value: str) -> bool:
    return is_xml_text(value) and "\r" not in value and value == value.strip()


def _format_created(seconds: int) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_created(text: str) -> int:
    try:
        moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise MetadataError(f"blahvm metadata: created {text!r} is not YYYY-MM-DDTHH:MM:SSZ") from None
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def metadata_element(meta: GuestMetadata) -> ET.Element:
    """The ``<blahvm:job>`` element to put inside the domain's ``<metadata>``."""
    job = ET.Element(_tag("job"))
    values = {
        "id": meta.job_id,
        "user": meta.user,
        "vo": meta.vo,
        "environment": meta.environment,
        "host": meta.host,
        "created": _format_created(meta.created),
        "name": meta.name,
        "ledger": meta.ledger,
    }
    for field, value in values.items():
        if value is None:
            continue
        child = ET.SubElement(job, _tag(field))
        if _plain(value):
            child.text = value
        else:
            child.set("encoding", "base64")
            child.text = base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii")
    return job


def _value(child: ET.Element) -> str:
    text = child.text or ""
    encoding = child.get("encoding")
    if encoding is None:
        return text
    if encoding != "base64":
        raise MetadataError(f"blahvm metadata: unknown encoding {encoding!r}")
    try:
        return base64.b64decode(text.strip(), validate=True).decode("utf-8", "surrogatepass")
    except (binascii.Error, UnicodeDecodeError):
        raise MetadataError("blahvm metadata: a base64 value does not decode") from None


def read_metadata(domain_xml: str) -> Optional[GuestMetadata]:
    """The blahvm metadata of a domain's XML, or None when the domain is not blahvm's.

    Raises ``MetadataError`` when the blahvm element is there but damaged.
    """
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as error:
        raise MetadataError(f"domain XML does not parse: {error}") from None
    job = root.find(f"metadata/{_tag('job')}")
    if job is None:
        return None
    found = {}
    for child in job:
        field = child.tag[len(NAMESPACE) + 2 :] if child.tag.startswith(f"{{{NAMESPACE}}}") else None
        if field in _REQUIRED + _OPTIONAL:
            found[field] = _value(child)
    missing = [field for field in _REQUIRED if field not in found]
    if missing:
        raise MetadataError(f"blahvm metadata lacks {', '.join(missing)}")
    return GuestMetadata(
        job_id=found["id"],
        user=found["user"],
        environment=found["environment"],
        host=found["host"],
        created=_parse_created(found["created"]),
        vo=found.get("vo"),
        name=found.get("name"),
        ledger=found.get("ledger"),
    )
