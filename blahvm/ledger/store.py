"""The ledger of one execution host: reserve a slot, move an entry through its states, close it."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

from blahvm.ledger import database
from blahvm.ledger.capacity import check_fits, free_capacity, lowest_free_slot
from blahvm.ledger.entries import LIVE_STATES, Capacity, Entry, State, Usage, may_follow
from blahvm.ledger.processes import process_start_time
from blahvm.model import HostConfig, Outcome
from blahvm.quantities import Size

_COLUMNS = (
    "id, job_id, slot, state, user, vo, environment, memory, vcpus, guest, volumes, run_dir, "
    "pid, pid_start, steps, timings, outcome, reason, created, updated, closed, version"
)
_LIVE = "state != 'closed'"
# Fields a transition may set, besides the state.
_SETTABLE = frozenset({"guest", "volumes", "run_dir", "pid"})

States = Union[State, str, Iterable[Union[State, str]]]


class Ledger:
    """The durable state of this host, in ``<host.state_dir>/ledger.sqlite``.

    Every write is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock is the cross-process lock
    that keeps concurrent hooks from over-committing the host. A hook that waits longer than
    ``busy_timeout`` seconds for it gets ``LedgerBusy``.
    """

    def __init__(
        self,
        host: HostConfig,
        *,
        path: Optional[str] = None,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.path = path or database.ledger_path(host.state_dir)
        self._clock = clock
        self._db = database.connect(self.path, busy_timeout)

    # -- connection ---------------------------------------------------------------------------

    def disconnect(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.disconnect()

    def _errors(self) -> database.translated_errors:
        return database.translated_errors(self.path)

    def _write(self) -> "_WriteTransaction":
        return _WriteTransaction(self._db, self._errors())

    # -- writes -------------------------------------------------------------------------------

    def reserve(
        self,
        job_id: str,
        user: str,
        vo: Optional[str],
        environment: str,
        memory: int,
        vcpus: int,
        pid: Optional[int] = None,
    ) -> Entry:
        """Take the lowest free slot for ``job_id``, owned by ``pid`` (default: this process).

        If the job already has a live entry, that entry is returned unchanged and nothing is taken:
        the caller decides whether to reuse it or tear it down. Raises ``NoCapacity`` when the host
        has no room for ``memory`` bytes and ``vcpus`` more.
        """
        _require_text("job_id", job_id)
        _require_text("user", user)
        _require_text("environment", environment)
        if vo is not None:
            _require_text("vo", vo)
        memory, vcpus = _require_count("memory", memory, Size), _require_count("vcpus", vcpus, int)
        pid = os.getpid() if pid is None else _require_count("pid", pid, int)
        pid_start = process_start_time(pid)
        with self._write() as db:
            existing = _select_one(db, f"WHERE job_id = ? AND {_LIVE}", (job_id,))
            if existing is not None:
                return existing
            live = db.execute(f"SELECT slot, memory, vcpus FROM entries WHERE {_LIVE}").fetchall()
            check_fits(self.host, _sum_usage(live), memory, vcpus)
            now = self._clock()
            cursor = db.execute(
                "INSERT INTO entries (job_id, slot, state, user, vo, environment, memory, vcpus,"
                " pid, pid_start, steps, created, updated, version)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    lowest_free_slot(row["slot"] for row in live),
                    State.RESERVED.value,
                    user,
                    vo,
                    environment,
                    int(memory),
                    vcpus,
                    pid,
                    pid_start,
                    json.dumps([[State.RESERVED.value, now]]),
                    now,
                    now,
                    _next_version(db),
                ),
            )
            return _select_one(db, "WHERE id = ?", (cursor.lastrowid,))

    def transition(
        self,
        job_id: str,
        expected_states: States,
        new_state: Union[State, str],
        *,
        expected_version: Optional[int] = None,
        **fields,
    ) -> Optional[Entry]:
        """Move the job's live entry to ``new_state`` and set ``fields``, if it is in ``expected_states``.

        Compare-and-set: returns the updated entry, or None (changing nothing) when the job has no
        live entry, it is in another state, or its version is not ``expected_version``.
        Settable fields: ``guest``, ``volumes`` (names), ``run_dir``, and ``pid`` (the new owner;
        its start time is read). Raises ``ValueError`` for a backward move or an unknown field.
        """
        expected = _states(expected_states)
        new = State(new_state)
        if new is State.CLOSED:
            raise ValueError("a transition cannot close an entry: use close()")
        for old in expected:
            if not may_follow(old, new):
                raise ValueError(f"an entry cannot move from {old} back to {new}")
        updates = _column_updates(fields)
        with self._write() as db:
            entry = _select_one(db, f"WHERE job_id = ? AND {_LIVE}", (job_id,))
            if entry is None or entry.state not in expected:
                return None
            if expected_version is not None and entry.version != expected_version:
                return None
            now = self._clock()
            steps = list(entry.steps) + ([(new, now)] if new is not entry.state else [])
            updates.update(state=new.value, steps=_dump_steps(steps), updated=now)
            _update(db, entry.id, updates)
            return _select_one(db, "WHERE id = ?", (entry.id,))

    def close(
        self,
        job_id: str,
        outcome: Outcome,
        reason: Optional[str] = None,
        *,
        expected_version: Optional[int] = None,
    ) -> bool:
        """Free the job's slot and keep its entry as history; False if there was nothing live to close.

        Closing a closed or unknown job is not an error. With ``expected_version``, only that
        version of the entry is closed (not, say, a newer run of a requeued job).
        """
        outcome = Outcome(outcome)
        with self._write() as db:
            entry = _select_one(db, f"WHERE job_id = ? AND {_LIVE}", (job_id,))
            if entry is None:
                return False
            if expected_version is not None and entry.version != expected_version:
                return False
            now = self._clock()
            steps = list(entry.steps) + [(State.CLOSED, now)]
            _update(
                db,
                entry.id,
                {
                    "state": State.CLOSED.value,
                    "outcome": outcome.value,
                    "reason": reason,
                    "steps": _dump_steps(steps),
                    "updated": now,
                    "closed": now,
                },
            )
            return True

    def record_timing(self, job_id: str, phase: str, seconds: float) -> bool:
        """Record how long ``phase`` took for the job's latest run (live, else last closed).

        Recording a phase again replaces its time. False if the job has no entry at all.
        """
        _require_text("phase", phase)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            math.isfinite(seconds) and seconds >= 0
        ):
            raise ValueError(f"timing of {phase!r}: {seconds!r} is not a number of seconds >= 0")
        with self._write() as db:
            entry = _select_one(db, "WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
            if entry is None:
                return False
            timings = dict(entry.timings)
            timings[phase] = float(seconds)
            _update(db, entry.id, {"timings": json.dumps(list(timings.items()))})
            return True

    def prune(self, older_than: float) -> int:
        """Delete closed entries closed more than ``older_than`` seconds ago; returns how many."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM entries WHERE state = 'closed' AND closed < ?",
                (self._clock() - older_than,),
            )
            return cursor.rowcount

    # -- queries ------------------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[Entry]:
        """The job's live entry, else its most recently closed one, else None."""
        with self._errors():
            return _select_one(self._db, "WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))

    def live(self) -> Tuple[Entry, ...]:
        """Every entry that holds a slot, by slot number."""
        with self._errors():
            return _select(self._db, f"WHERE {_LIVE} ORDER BY slot")

    def history(self, limit: int = 100) -> Tuple[Entry, ...]:
        """Closed entries, the most recently closed first."""
        with self._errors():
            return _select(
                self._db, "WHERE state = 'closed' ORDER BY closed DESC, id DESC LIMIT ?", (limit,)
            )

    def usage(self) -> Usage:
        with self._errors():
            rows = self._db.execute(f"SELECT memory, vcpus FROM entries WHERE {_LIVE}").fetchall()
        return _sum_usage(rows)

    def free(self, host: Optional[HostConfig] = None) -> Capacity:
        """What ``host`` (default: this ledger's) still offers beside the live entries."""
        return free_capacity(host or self.host, self.usage())


class _WriteTransaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception, SQLite errors translated."""

    def __init__(self, db: sqlite3.Connection, errors: database.translated_errors) -> None:
        self._db = db
        self._errors = errors

    def __enter__(self) -> sqlite3.Connection:
        with self._errors:
            self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, kind, error, traceback) -> bool:
        with self._errors:
            try:
                if error is None:
                    self._db.execute("COMMIT")
            finally:
                # After an error in the body, or a failed COMMIT: leave the connection usable.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
        return self._errors.__exit__(kind, error, traceback)


# -- rows and fields ------------------------------------------------------------------------------


def _select(db: sqlite3.Connection, where: str, params: tuple = ()) -> Tuple[Entry, ...]:
    rows = db.execute(f"SELECT {_COLUMNS} FROM entries {where}", params).fetchall()
    return tuple(_entry(row) for row in rows)


def _select_one(db: sqlite3.Connection, where: str, params: tuple = ()) -> Optional[Entry]:
    found = _select(db, where, params)
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
    )


def _update(db: sqlite3.Connection, entry_id: int, columns: dict) -> None:
    # Column names come from this module only (_SETTABLE and literals), never from callers' strings.
    columns = dict(columns, version=_next_version(db))
    assignments = ", ".join(f"{name} = ?" for name in columns)
    db.execute(f"UPDATE entries SET {assignments} WHERE id = ?", (*columns.values(), entry_id))


def _next_version(db: sqlite3.Connection) -> int:
    db.execute("UPDATE counters SET value = value + 1 WHERE name = 'version'")
    return db.execute("SELECT value FROM counters WHERE name = 'version'").fetchone()[0]


def _column_updates(fields: dict) -> dict:
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise ValueError(
            f"transition cannot set {', '.join(sorted(unknown))} "
            f"(settable: {', '.join(sorted(_SETTABLE))})"
        )
    columns = {}
    for name in ("guest", "run_dir"):
        if name in fields:
            value = fields[name]
            if value is not None:
                _require_text(name, value)
            columns[name] = value
    if "volumes" in fields:
        volumes = fields["volumes"]
        if isinstance(volumes, str) or not all(isinstance(v, str) and v for v in volumes):
            raise ValueError(f"volumes must be a list of volume names, not {volumes!r}")
        columns["volumes"] = json.dumps(list(volumes))
    if "pid" in fields:
        pid = _require_count("pid", fields["pid"], int)
        columns["pid"] = pid
        columns["pid_start"] = process_start_time(pid)
    return columns


def _dump_steps(steps: Iterable[Tuple[State, float]]) -> str:
    return json.dumps([[state.value, when] for state, when in steps])


def _states(states: States) -> frozenset:
    if isinstance(states, (State, str)):
        states = [states]
    found = frozenset(State(state) for state in states)
    if not found <= LIVE_STATES:
        raise ValueError("a closed entry cannot be moved; reserve the job again instead")
    return found


def _sum_usage(rows: Iterable[sqlite3.Row]) -> Usage:
    rows = list(rows)
    return Usage(
        guests=len(rows),
        memory=Size(sum(row["memory"] for row in rows)),
        vcpus=sum(row["vcpus"] for row in rows),
    )


def _require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")


def _require_count(name: str, value: object, kind: type):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
    return kind(value)
