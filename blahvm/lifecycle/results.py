"""What each lifecycle step answers: a frozen value with an ``Outcome`` and a one-line message."""

from __future__ import annotations

from typing import Optional, Tuple

import attrs

from blahvm.model import Outcome
from blahvm.quantities import Size


@attrs.frozen
class PrepareResult:
    """The job's guest is up (``OK``), or why not; ``reused`` when an earlier prepare had made it."""

    outcome: Outcome
    message: str
    job_id: str
    guest: Optional[str] = None
    run_dir: Optional[str] = None
    socket: Optional[str] = None  # the agent's host-side socket, owned by the job's user
    reused: bool = False
    timings: Tuple[Tuple[str, float], ...] = ()  # seconds per phase: clone, boot, ready


@attrs.frozen
class ReadyResult:
    outcome: Outcome
    message: str
    job_id: str
    seconds: float = 0.0


@attrs.frozen
class TeardownResult:
    """``OK`` once nothing of the job is left (also when nothing was there)."""

    outcome: Outcome
    message: str
    job_id: str
    guest_removed: bool = False
    volumes_removed: Tuple[str, ...] = ()
    seconds: float = 0.0


@attrs.frozen
class ReapReport:
    """What ``reap`` removed, or with ``dry_run`` would remove."""

    outcome: Outcome
    message: str
    dry_run: bool = False
    guests: Tuple[str, ...] = ()  # domains with blahvm metadata that no live entry owns
    volumes: Tuple[str, ...] = ()  # blahvm-named clone volumes that no live entry owns
    run_dirs: Tuple[str, ...] = ()
    entries_closed: Tuple[str, ...] = ()  # job ids whose guest vanished or whose owner died


@attrs.frozen
class Capacity:
    """What this host can still take; None means no limit on that resource."""

    outcome: Outcome
    message: str
    guests: int = 0
    memory: Optional[Size] = None
    vcpus: Optional[int] = None
    environments: Tuple[str, ...] = ()  # environments one more guest of which fits now
    queues: Tuple[Tuple[str, int], ...] = ()  # (queue, free slots) of each queue with a slots_per_host, by name
