"""Pause and resume a running guest (``virDomainSuspend``/``virDomainResume``): its vcpus stop, its memory stays.

Both are idempotent and return the guest's state afterwards (``paused``, ``running``...), or None when no
such guest exists. A paused guest keeps its memory and devices; no CPU time passes in it until resumed.
"""

from __future__ import annotations

from typing import Optional

from blahvm.hypervisor.connection import Connection
from blahvm.hypervisor.errors import LibvirtCallFailed, NotFound
from blahvm.hypervisor.guests import domain_state

_RUNNING = ("running", "blocked")


def pause(conn: Connection, name: str) -> Optional[str]:
    return _switch(conn, name, "pause", _RUNNING, "suspend")


def resume(conn: Connection, name: str) -> Optional[str]:
    return _switch(conn, name, "resume", ("paused",), "resume")


def _switch(conn: Connection, name: str, what: str, from_states: tuple, method: str) -> Optional[str]:
    state = domain_state(conn, name)  # checks the name
    if state not in from_states:
        return state  # already there, stopped, or gone: nothing to do
    try:
        domain = conn.call(f"look up {name}", conn.raw.lookupByName, name)
        conn.call(f"{what} {name}", getattr(domain, method))
    except NotFound:
        return None
    except LibvirtCallFailed:
        # It may have changed state (stopped, or someone else did the same) between the look and the call.
        if domain_state(conn, name) in from_states:
            raise
    return domain_state(conn, name)
