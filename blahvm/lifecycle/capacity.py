"""``capacity``: what this host can still take, from the ledger alone (no hypervisor call)."""

from __future__ import annotations

from typing import Tuple

from blahvm.ledger import Ledger, LedgerError
from blahvm.lifecycle.results import Capacity
from blahvm.lifecycle.static import free_count
from blahvm.model import Environment, Outcome, SiteConfig


def capacity(config: SiteConfig) -> Capacity:
    """Free guests, memory and vcpus, which environments one more guest of would fit now, and the
    free slots of each queue with a ``slots_per_host``.

    A static environment fits only while one of its guests is free. A job routed to a queue with no
    free slot is refused here whatever its environment.
    """
    try:
        with Ledger(config.host) as ledger:
            free = ledger.free()
            live = ledger.live()
    except LedgerError as error:
        return Capacity(Outcome.RETRY_ELSEWHERE, f"capacity: {error}")
    leasable = {name: free_count(env, live) for name, env in config.environments.items() if env.guests}
    fitting = tuple(
        sorted(name for name, env in config.environments.items() if _fits(free, env) and leasable.get(name, 1))
    )
    message = f"{free.guests} guests free; fits now: {', '.join(fitting) or 'none'}"
    if leasable:
        message += "; static guests free: " + ", ".join(f"{name} {count}" for name, count in sorted(leasable.items()))
    queues = _queue_room(config, live)
    if queues:
        message += "; queue slots free: " + ", ".join(f"{name} {count}" for name, count in queues)
    return Capacity(Outcome.OK, message, free.guests, free.memory, free.vcpus, fitting, queues)


def _queue_room(config: SiteConfig, live) -> Tuple[Tuple[str, int], ...]:
    """(queue, free slots on this host) for each queue with a ``slots_per_host``, by name."""
    return tuple(
        (name, max(0, queue.slots_per_host - sum(1 for entry in live if entry.queue == name)))
        for name, queue in sorted(config.queues.items())
        if queue.slots_per_host is not None
    )


def _fits(free, environment: Environment) -> bool:
    return (
        free.guests >= 1
        and (free.memory is None or environment.memory <= free.memory)
        and (free.vcpus is None or environment.vcpus <= free.vcpus)
    )
