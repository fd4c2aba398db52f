"""Entries to and from SQL rows: the only place that knows the table's columns."""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable, Optional, Tuple

from blahvm.ledger.entries import Consumed, Entry, State, Usage
from blahvm.model import Outcome
from blahvm.quantities import Size

LIVE = "state != 'closed'"
_COLUMNS = (
    "id, job_id, slot, state, user, vo, environment, memory, vcpus, guest, volumes, run_dir, "
    "pid, pid_start, steps, timings, outcome, reason, created, updated, closed, version, "
    "cpu_seconds, vcpu_seconds, max_memory, disk_read, disk_write, usage_note, queue"
)


def select(db: sqlite3.Connection, where: str, params: tuple = ()) -> Tuple[Entry, ...]:
    rows = db.execute(f"SELECT {_COLUMNS} FROM entries {where}", params).fetchall()
    return tuple(_entry(row) for row in rows)


def select_one(db: sqlite3.Connection, where: str, params: tuple = ()) -> Optional[Entry]:
    found = select(db, where, params)
    return found[0] if found else None


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        id=row["id"],
        job_id=row["job_id"],
        slot=row["slot"],
        state=State(row["state"]),
        user=row["user"],
        vo=row["vo"],
        environment=row["environment"],
        queue=row["queue"],
        memory=Size(row["memory"]),
        vcpus=row["vcpus"],
        guest=row["guest"],
        volumes=tuple(json.loads(row["volumes"])),
        run_dir=row["run_dir"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        steps=tuple((State(state), when) for state, when in json.loads(row["steps"])),
        timings=tuple((phase, seconds) for phase, seconds in json.loads(row["timings"])),
        outcome=None if row["outcome"] is None else Outcome(row["outcome"]),
        reason=row["reason"],
        created=row["created"],
        updated=row["updated"],
        closed=row["closed"],
        version=row["version"],
        consumed=Consumed(
            cpu_seconds=row["cpu_seconds"],
            vcpu_seconds=row["vcpu_seconds"],
            max_memory=None if row["max_memory"] is None else Size(row["max_memory"]),
            disk_read=row["disk_read"],
            disk_write=row["disk_write"],
            note=row["usage_note"],
        ),
    )


def update(db: sqlite3.Connection, entry_id: int, columns: dict) -> None:
    # Column names come from this package only (arguments.SETTABLE and literals), never from callers.
    columns = dict(columns, version=next_version(db))
    assignments = ", ".join(f"{name} = ?" for name in columns)
    db.execute(f"UPDATE entries SET {assignments} WHERE id = ?", (*columns.values(), entry_id))


def next_version(db: sqlite3.Connection) -> int:
    db.execute("UPDATE counters SET value = value + 1 WHERE name = 'version'")
    return db.execute("SELECT value FROM counters WHERE name = 'version'").fetchone()[0]


def dump_steps(steps: Iterable[Tuple[State, float]]) -> str:
    return json.dumps([[state.value, when] for state, when in steps])


def sum_usage(rows: Iterable[sqlite3.Row]) -> Usage:
    rows = list(rows)
    return Usage(
        guests=len(rows),
        memory=Size(sum(row["memory"] for row in rows)),
        vcpus=sum(row["vcpus"] for row in rows),
    )


def consumed_columns(consumed: Consumed) -> dict:
    return {
        "cpu_seconds": consumed.cpu_seconds,
        "vcpu_seconds": consumed.vcpu_seconds,
        "max_memory": None if consumed.max_memory is None else int(consumed.max_memory),
        "disk_read": consumed.disk_read,
        "disk_write": consumed.disk_write,
        "usage_note": consumed.note,
    }


def dump_timings(timings: Iterable[Tuple[str, float]]) -> str:
    return json.dumps([[phase, seconds] for phase, seconds in timings])
