"""Telling a live owner process from a dead one whose pid was reused."""

from __future__ import annotations

from typing import Optional

from blahvm.ledger.entries import Entry


def process_start_time(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks after boot, or None if it does not exist
    or is a zombie (dead, only not yet collected by its parent)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # field 3, state
        return None
    return int(fields[19])  # field 22, starttime


def owner_alive(entry: Entry) -> bool:
    """Whether the process recorded as the entry's owner still runs (the same process, not a pid reuse)."""
    if entry.pid is None:
        return False
    started = process_start_time(entry.pid)
    if started is None:
        return False
    return entry.pid_start is None or started == entry.pid_start
