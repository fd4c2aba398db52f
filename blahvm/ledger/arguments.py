"""Checking what callers pass in, with a one-line ``ValueError`` that names the bad argument."""

from __future__ import annotations

import json
import math
from typing import Iterable, Tuple, Union

from blahvm.ledger.entries import LIVE_STATES, Consumed, State
from blahvm.ledger.processes import process_start_time

# Fields a transition may set, besides the state.
SETTABLE = frozenset({"guest", "volumes", "run_dir", "pid"})

States = Union[State, str, Iterable[Union[State, str]]]


def column_updates(fields: dict) -> dict:
    unknown = set(fields) - SETTABLE
    if unknown:
        raise ValueError(
            f"transition cannot set {', '.join(sorted(unknown))} "
            f"(settable: {', '.join(sorted(SETTABLE))})"
        )
    columns = {}
    for name in ("guest", "run_dir"):
        if name in fields:
            value = fields[name]
            if value is not None:
                require_text(name, value)
            columns[name] = value
    if "volumes" in fields:
        volumes = fields["volumes"]
        if isinstance(volumes, str) or not all(isinstance(v, str) and v for v in volumes):
            raise ValueError(f"volumes must be a list of volume names, not {volumes!r}")
        columns["volumes"] = json.dumps(list(volumes))
    if "pid" in fields:
        pid = require_count("pid", fields["pid"], int)
        columns["pid"] = pid
        columns["pid_start"] = process_start_time(pid)
    return columns


def guest_names(names: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(names, str):
        raise ValueError(f"lease must be a list of guest names, not {names!r}")
    names = tuple(names)
    for name in names:
        require_text("guest", name)
    return names


def states(states: States) -> frozenset:
    if isinstance(states, (State, str)):
        states = [states]
    found = frozenset(State(state) for state in states)
    if not found <= LIVE_STATES:
        raise ValueError("a closed entry cannot be moved; reserve the job again instead")
    return found


def require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")


def require_count(name: str, value: object, kind: type):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
    return kind(value)


def require_seconds(phase: str, seconds: object) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
        math.isfinite(seconds) and seconds >= 0
    ):
        raise ValueError(f"timing of {phase!r}: {seconds!r} is not a number of seconds >= 0")
    return float(seconds)


def require_consumed(consumed: object) -> None:
    if not isinstance(consumed, Consumed):
        raise ValueError(f"usage must be a Consumed, not {consumed!r}")
    for name in ("cpu_seconds", "vcpu_seconds"):
        value = getattr(consumed, name)
        if value is not None:
            require_seconds(name, value)
    for name in ("max_memory", "disk_read", "disk_write"):
        value = getattr(consumed, name)
        if value is not None:
            require_count(name, value, int)
    if consumed.note is not None:
        require_text("note", consumed.note)
