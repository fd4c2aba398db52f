"""Slot accounting rules, pure: what is free, whether a request fits, which slot it gets."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from blahvm.ledger.entries import Capacity, Usage
from blahvm.ledger.errors import NoCapacity
from blahvm.model import HostConfig
from blahvm.quantities import Size


def free_capacity(host: HostConfig, usage: Usage) -> Capacity:
    """What ``host`` still offers once ``usage`` is taken (never negative, even after a config shrink)."""
    return Capacity(
        guests=max(0, host.max_guests - usage.guests),
        memory=None if host.memory is None else Size(max(0, host.memory - usage.memory)),
        vcpus=None if host.vcpus is None else max(0, host.vcpus - usage.vcpus),
    )


def check_fits(host: HostConfig, usage: Usage, memory: Size, vcpus: int) -> None:
    """Raise ``NoCapacity`` naming the first exhausted resource unless one more guest fits."""
    free = free_capacity(host, usage)
    _check("guests", 1, free.guests, host.max_guests)
    _check("memory", Size(memory), free.memory, host.memory)
    _check("vcpus", vcpus, free.vcpus, host.vcpus)


def check_queue_fits(queue: str, slots: Optional[int], held: int) -> None:
    """Raise ``NoCapacity`` naming ``queue`` when its live guests on this host (``held``) already reach ``slots``."""
    if slots is not None:
        _check(f"slots of queue {queue}", 1, max(0, slots - held), slots)


def _check(resource: str, requested: int, free: Optional[int], total: Optional[int]) -> None:
    if free is not None and total is not None and requested > free:
        raise NoCapacity(resource, requested, free, total)


def lowest_free_slot(taken: Iterable[int]) -> int:
    """The smallest slot number (from 0) that no live entry holds."""
    used = set(taken)
    slot = 0
    while slot in used:
        slot += 1
    return slot


def free_guest(lease: Sequence[str], held: Iterable[Optional[str]]) -> str:
    """The first of a static environment's guests ``lease`` that is not ``held``; else ``NoCapacity``."""
    taken = set(held)
    for guest in lease:
        if guest not in taken:
            return guest
    raise NoCapacity("static guests", 1, 0, len(lease))
