"""Accounting records as an APEL individual job message (``APEL-individual-job-message: v0.3``), the
text grid sites hand to the APEL client or SSM for the EGI/WLCG accounting portal (pure).

Each record is one run of a job in its guest, figures from blahvm's ledger: ``CpuDuration`` is the
guest's CPU time (QEMU's, as libvirt counts it), ``WallDuration`` the time the job held its slot
(provisioning, clone and boot or restore, plus the run), ``MemoryReal`` the guest's peak resident
memory in KiB, ``Processors`` its vcpus. Runs whose CPU time was lost (the guest vanished before it
was read) are left out and counted: a record with no CPU time would report an idle job.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import attrs

from blahvm.lifecycle.accounting import AccountingRecord

HEADER = "APEL-individual-job-message: v0.3"
END = "%%"
MAX_TEXT = 255


@attrs.frozen
class ApelSite:
    """What the site publishes about itself: its GOCDB name, its CE (``SubmitHost``), this host's
    name (``MachineName``) and the host's HEPSPEC06 per processor (``ServiceLevel``)."""

    site: str
    submit_host: str
    machine: str
    hepspec: float

    def __attrs_post_init__(self) -> None:
        for name in ("site", "submit_host", "machine"):
            problem = text_problem(getattr(self, name))
            if problem:
                raise ValueError(f"{name.replace('_', ' ')}: {problem}")
        if isinstance(self.hepspec, bool) or not isinstance(self.hepspec, (int, float)) \
                or not 0 < self.hepspec < 1e6 or self.hepspec != self.hepspec:
            raise ValueError(f"HEPSPEC06 per processor must be a number above 0, got {self.hepspec!r}")


def text_problem(value: object) -> Optional[str]:
    """Why ``value`` cannot be one field's value of a message, or None: it must be one printable line."""
    if not isinstance(value, str) or not value.strip():
        return "must not be empty"
    if len(value) > MAX_TEXT:
        return f"longer than {MAX_TEXT} characters"
    if not value.isprintable() or value != value.strip():
        return "must be one line of printable characters without leading or trailing spaces"
    return None


def _field(value: Optional[str]) -> Optional[str]:
    """A job's own text (user, VO, queue, job id) as a field value, or None to leave the field out."""
    return value if value is not None and text_problem(value) is None else None


def record_lines(record: AccountingRecord, site: ApelSite) -> List[str]:
    """The ``Key: value`` lines of one record (its CPU time must be known)."""
    fields: List[Tuple[str, object]] = [
        ("Site", site.site),
        ("SubmitHost", site.submit_host),
        ("MachineName", site.machine),
        ("Queue", _field(record.queue)),
        ("LocalJobId", _field(record.job_id) or "unknown"),
        ("LocalUserId", _field(record.user)),
        ("VO", _field(record.vo)),
        ("WallDuration", round(record.provision_seconds + record.wall_seconds)),
        ("CpuDuration", round(record.cpu_seconds or 0.0)),
        ("Processors", record.vcpus),
        ("NodeCount", 1),
        ("StartTime", int(record.started)),
        ("EndTime", int(record.closed)),
        ("InfrastructureType", "grid"),
        ("MemoryReal", None if record.max_memory_bytes is None else record.max_memory_bytes // 1024),
        ("ServiceLevelType", "HEPSPEC"),
        ("ServiceLevel", f"{site.hepspec:g}"),
    ]
    return [f"{key}: {value}" for key, value in fields if value is not None]


def apel_message(records: Iterable[AccountingRecord], site: ApelSite) -> Tuple[str, int]:
    """The message for ``records`` and how many were left out for want of CPU time. No record gives
    an empty string (APEL refuses a message without records)."""
    lines: List[str] = []
    skipped = 0
    for record in records:
        if record.cpu_seconds is None:
            skipped += 1
            continue
        lines += record_lines(record, site)
        lines.append(END)
    if not lines:
        return "", skipped
    return "\n".join([HEADER, *lines]) + "\n", skipped
