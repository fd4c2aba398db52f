"""The ledger's value types: one entry per run of a batch job on this host, and the totals."""

from __future__ import annotations

import enum
from typing import Optional, Tuple

import attrs

from blahvm.model import Outcome
from blahvm.quantities import Size


class State(str, enum.Enum):
    """Where a job's guest is in its life; entries only ever move forward through this order."""

    RESERVED = "reserved"  # slot taken, nothing on the hypervisor yet
    CLONING = "cloning"  # clone volumes being created
    BOOTING = "booting"  # guest defined and starting, agent not answering yet
    RUNNING = "running"  # agent answers; the payload may run
    TEARING_DOWN = "tearing_down"  # guest and volumes being removed
    CLOSED = "closed"  # slot free; kept as history

    def __str__(self) -> str:
        return self.value


LIVE_STATES = frozenset(s for s in State if s is not State.CLOSED)
_ORDER = {state: index for index, state in enumerate(State)}


def may_follow(old: State, new: State) -> bool:
    """Whether a live entry in ``old`` may move to ``new`` by a transition.

    Forward only (skipping is fine: a leased static guest needs no cloning), staying put is an
    update of fields, and closing is ``Ledger.close``'s job, not a transition's.
    """
    return old is not State.CLOSED and new is not State.CLOSED and _ORDER[new] >= _ORDER[old]


@attrs.frozen
class Consumed:
    """What the job's guest used, read from the hypervisor before it was destroyed; None where unknown.

    ``note`` says what is missing and why (the guest was gone before its statistics could be read).
    """

    cpu_seconds: Optional[float] = None  # every thread of the guest's QEMU
    vcpu_seconds: Optional[float] = None  # the guest's vcpus alone
    max_memory: Optional[Size] = None
    disk_read: Optional[int] = None  # bytes
    disk_write: Optional[int] = None
    note: Optional[str] = None

    @property
    def known(self) -> bool:
        return self.cpu_seconds is not None


@attrs.frozen
class Entry:
    """One run of batch job ``job_id`` on this host: its slot, its guest, and what happened to it.

    ``version`` changes with every write and is never reused (not even by a new run of the same job):
    pass it back as ``expected_version`` to act only if nobody changed the entry since it was read. ``steps`` holds when each state was entered; ``timings`` the
    seconds each phase took (``clone``, ``boot``, ``ready``, ``run``, ``teardown``...), in recording order.
    """

    id: int
    job_id: str
    slot: int
    state: State
    user: str
    vo: Optional[str]
    environment: str
    memory: Size
    vcpus: int
    guest: Optional[str] = None
    volumes: Tuple[str, ...] = ()
    run_dir: Optional[str] = None
    pid: Optional[int] = None
    pid_start: Optional[int] = None  # the owner's start time in clock ticks after boot
    steps: Tuple[Tuple[State, float], ...] = ()
    timings: Tuple[Tuple[str, float], ...] = ()
    outcome: Optional[Outcome] = None
    reason: Optional[str] = None
    created: float = 0.0
    updated: float = 0.0
    closed: Optional[float] = None
    version: int = 1
    consumed: Consumed = Consumed()
    queue: Optional[str] = None  # the queue the job was routed to; None for entries of an older blahvm

    @property
    def live(self) -> bool:
        return self.state is not State.CLOSED

    def entered(self, state: State) -> Optional[float]:
        """When the entry last entered ``state`` (seconds since the epoch), or None if it never did."""
        found = None
        for step, when in self.steps:
            if step is state:
                found = when
        return found

    def timing(self, phase: str) -> Optional[float]:
        return dict(self.timings).get(phase)


@attrs.frozen
class Usage:
    """What the live entries hold together."""

    guests: int = 0
    memory: Size = Size(0)
    vcpus: int = 0


@attrs.frozen
class Capacity:
    """What is still free on the host; None means the host sets no limit on that resource."""

    guests: int
    memory: Optional[Size]
    vcpus: Optional[int]
