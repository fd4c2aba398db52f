"""The ledger of one execution host: reserve a slot, move an entry through its states, close it."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable, Optional, Sequence, Tuple, Union

from blahvm.ledger import arguments, database, rows
from blahvm.ledger.arguments import States
from blahvm.ledger.capacity import check_fits, check_queue_fits, free_capacity, free_guest, lowest_free_slot
from blahvm.ledger.entries import Capacity, Consumed, Entry, State, Usage, may_follow
from blahvm.ledger.processes import process_start_time
from blahvm.model import HostConfig, Outcome
from blahvm.quantities import Size


class Ledger:
    """The durable state of this host, in ``<host.state_dir>/ledger.sqlite``.

    Every write is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock is the cross-process lock
    that keeps concurrent hooks from over-committing the host. A hook that waits longer than
    ``busy_timeout`` seconds for it gets ``LedgerBusy``. Open one ``Ledger`` per process (SQLite
    connections must not cross a fork); the constructor creates and migrates the file as needed.
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
        lease: Sequence[str] = (),
        queue: Optional[str] = None,
        queue_slots: Optional[int] = None,
    ) -> Entry:
        """Take the lowest free slot for ``job_id``, owned by ``pid`` (default: this process).

        If the job already has a live entry, that entry is returned unchanged and nothing is taken:
        the caller decides whether to reuse it or tear it down. Raises ``NoCapacity`` when the host
        has no room for ``memory`` bytes and ``vcpus`` more.

        With ``lease`` (a static environment's guest names), the entry also takes the first of them
        that no live entry holds, recorded as its ``guest``; ``NoCapacity`` when all are held.

        ``queue`` (the queue the job was routed to) is recorded in the entry; with ``queue_slots``
        (that queue's ``slots_per_host``), ``NoCapacity`` naming the queue when that many live
        entries of the queue are already on this host.
        """
        arguments.require_text("job_id", job_id)
        arguments.require_text("user", user)
        arguments.require_text("environment", environment)
        if vo is not None:
            arguments.require_text("vo", vo)
        memory = arguments.require_count("memory", memory, Size)
        vcpus = arguments.require_count("vcpus", vcpus, int)
        pid = os.getpid() if pid is None else arguments.require_count("pid", pid, int)
        pid_start = process_start_time(pid)
        lease = arguments.guest_names(lease)
        if queue is not None:
            arguments.require_text("queue", queue)
        if queue_slots is not None:
            if queue is None:
                raise ValueError("queue_slots needs the queue it limits")
            queue_slots = arguments.require_count("queue_slots", queue_slots, int)
        with self._write() as db:
            existing = rows.select_one(db, f"WHERE job_id = ? AND {rows.LIVE}", (job_id,))
            if existing is not None:
                return existing
            live = db.execute(f"SELECT slot, memory, vcpus, guest, queue FROM entries WHERE {rows.LIVE}").fetchall()
            check_fits(self.host, rows.sum_usage(live), memory, vcpus)
            if queue_slots is not None:
                check_queue_fits(queue, queue_slots, sum(1 for row in live if row["queue"] == queue))
            guest = free_guest(lease, (row["guest"] for row in live)) if lease else None
            now = self._clock()
            cursor = db.execute(
                "INSERT INTO entries (job_id, slot, state, user, vo, environment, memory, vcpus,"
                " guest, pid, pid_start, steps, created, updated, version, queue)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    lowest_free_slot(row["slot"] for row in live),
                    State.RESERVED.value,
                    user,
                    vo,
                    environment,
                    int(memory),
                    vcpus,
                    guest,
                    pid,
                    pid_start,
                    rows.dump_steps([(State.RESERVED, now)]),
                    now,
                    now,
                    rows.next_version(db),
                    queue,
                ),
            )
            return rows.select_one(db, "WHERE id = ?", (cursor.lastrowid,))

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
        expected = arguments.states(expected_states)
        new = State(new_state)
        if new is State.CLOSED:
            raise ValueError("a transition cannot close an entry: use close()")
        for old in expected:
            if not may_follow(old, new):
                raise ValueError(f"an entry cannot move from {old} back to {new}")
        updates = arguments.column_updates(fields)
        with self._write() as db:
            entry = rows.select_one(db, f"WHERE job_id = ? AND {rows.LIVE}", (job_id,))
            if entry is None or entry.state not in expected:
                return None
            if expected_version is not None and entry.version != expected_version:
                return None
            now = self._clock()
            steps = list(entry.steps) + ([(new, now)] if new is not entry.state else [])
            updates.update(state=new.value, steps=rows.dump_steps(steps), updated=now)
            rows.update(db, entry.id, updates)
            return rows.select_one(db, "WHERE id = ?", (entry.id,))

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
            entry = rows.select_one(db, f"WHERE job_id = ? AND {rows.LIVE}", (job_id,))
            if entry is None:
                return False
            if expected_version is not None and entry.version != expected_version:
                return False
            now = self._clock()
            steps = list(entry.steps) + [(State.CLOSED, now)]
            rows.update(
                db,
                entry.id,
                {
                    "state": State.CLOSED.value,
                    "outcome": outcome.value,
                    "reason": reason,
                    "steps": rows.dump_steps(steps),
                    "updated": now,
                    "closed": now,
                },
            )
            return True

    def record_timing(self, job_id: str, phase: str, seconds: float) -> bool:
        """Record how long ``phase`` took for the job's latest run (live, else last closed).

        Recording a phase again replaces its time. False if the job has no entry at all.
        """
        arguments.require_text("phase", phase)
        seconds = arguments.require_seconds(phase, seconds)
        with self._write() as db:
            entry = rows.select_one(db, "WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
            if entry is None:
                return False
            timings = dict(entry.timings)
            timings[phase] = seconds
            rows.update(db, entry.id, {"timings": rows.dump_timings(timings.items())})
            return True

    def record_usage(self, job_id: str, consumed: Consumed) -> bool:
        """Record what the guest of the job's latest run (live, else last closed) used; replaces what was there.

        False if the job has no entry at all.
        """
        arguments.require_consumed(consumed)
        with self._write() as db:
            entry = rows.select_one(db, "WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
            if entry is None:
                return False
            rows.update(db, entry.id, rows.consumed_columns(consumed))
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
            return rows.select_one(self._db, "WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))

    def live(self) -> Tuple[Entry, ...]:
        """Every entry that holds a slot, by slot number."""
        with self._errors():
            return rows.select(self._db, f"WHERE {rows.LIVE} ORDER BY slot")

    def history(self, limit: int = 100) -> Tuple[Entry, ...]:
        """Closed entries, the most recently closed first."""
        with self._errors():
            return rows.select(
                self._db, "WHERE state = 'closed' ORDER BY closed DESC, id DESC LIMIT ?", (limit,)
            )

    def closed_since(self, since: float, job_id: Optional[str] = None) -> Tuple[Entry, ...]:
        """Entries closed at or after ``since`` (seconds since the epoch), the earliest closed first;
        with ``job_id``, only that job's runs."""
        where, params = "WHERE state = 'closed' AND closed >= ?", (float(since),)
        if job_id is not None:
            where, params = where + " AND job_id = ?", params + (job_id,)
        with self._errors():
            return rows.select(self._db, where + " ORDER BY closed, id", params)

    def usage(self) -> Usage:
        with self._errors():
            live = self._db.execute(f"SELECT memory, vcpus FROM entries WHERE {rows.LIVE}").fetchall()
        return rows.sum_usage(live)

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
