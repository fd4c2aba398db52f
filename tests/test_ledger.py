"""The host ledger: slot accounting, compare-and-set transitions, crash safety, concurrency."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from blahvm.ledger import (
    LIVE_STATES,
    SCHEMA_VERSION,
    Capacity,
    Ledger,
    LedgerBusy,
    LedgerError,
    NoCapacity,
    State,
    Usage,
    check_fits,
    free_capacity,
    lowest_free_slot,
    may_follow,
    owner_alive,
    process_start_time,
)
from blahvm.model import HostConfig, Outcome
from blahvm.quantities import Size

GiB = 1024**3
FORK = multiprocessing.get_context("fork")


def host_in(directory, max_guests=3, memory=None, vcpus=None) -> HostConfig:
    memory = None if memory is None else Size(memory)
    return HostConfig(max_guests=max_guests, memory=memory, vcpus=vcpus, state_dir=str(directory))


@pytest.fixture
def ledger(tmp_path):
    with Ledger(host_in(tmp_path / "state", max_guests=3, memory=8 * GiB, vcpus=4)) as opened:
        yield opened


def reserve(ledger, job_id, memory=GiB, vcpus=1):
    return ledger.reserve(job_id, "alice", "cms", "slc4", memory, vcpus)


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


# -- reserving ------------------------------------------------------------------------------------


def test_reserve_takes_the_lowest_free_slot_and_records_the_owner(ledger):
    first = reserve(ledger, "101")
    assert (first.slot, first.state, first.user, first.vo, first.environment) == (
        0,
        State.RESERVED,
        "alice",
        "cms",
        "slc4",
    )
    assert first.memory == Size(GiB) and str(first.memory) == "1GiB"
    assert first.pid == os.getpid()
    assert first.pid_start == process_start_time(os.getpid())
    assert first.entered(State.RESERVED) == first.created
    assert [reserve(ledger, j).slot for j in ("102", "103")] == [1, 2]
    ledger.close("102", Outcome.OK)
    assert reserve(ledger, "104").slot == 1


def test_reserve_is_idempotent_on_the_job_id(ledger):
    first = reserve(ledger, "101", memory=2 * GiB)
    again = ledger.reserve("101", "alice", "cms", "slc4", 4 * GiB, 3)
    assert again == first
    assert ledger.usage() == Usage(guests=1, memory=Size(2 * GiB), vcpus=1)


def test_a_closed_job_can_be_reserved_again_as_a_new_run(ledger):
    first = reserve(ledger, "101")
    ledger.close("101", Outcome.RETRY_ELSEWHERE, "requeued")
    second = reserve(ledger, "101")
    assert second.id != first.id and second.live
    assert ledger.get("101") == second
    assert [e.id for e in ledger.history()] == [first.id]


@pytest.mark.parametrize(
    "limits, request_, exhausted",
    [
        (dict(max_guests=1), dict(memory=GiB, vcpus=1), "guests"),
        (dict(max_guests=5, memory=3 * GiB), dict(memory=2 * GiB, vcpus=1), "memory"),
        (dict(max_guests=5, vcpus=3), dict(memory=GiB, vcpus=2), "vcpus"),
    ],
)
def test_a_full_host_refuses_and_names_what_is_exhausted(tmp_path, limits, request_, exhausted):
    with Ledger(host_in(tmp_path, **limits)) as ledger:
        ledger.reserve("1", "alice", None, "slc4", **request_)
        with pytest.raises(NoCapacity) as refused:
            ledger.reserve("2", "bob", None, "slc4", **request_)
        assert refused.value.resource == exhausted
        assert refused.value.ever_fits
        assert f"{exhausted} exhausted" in str(refused.value)
        assert ledger.get("2") is None
        assert ledger.usage().guests == 1


def test_a_queue_at_its_slots_per_host_refuses_and_names_the_queue(ledger):
    short = dict(queue="short", queue_slots=2)
    first = ledger.reserve("1", "alice", "cms", "slc4", GiB, 1, **short)
    ledger.reserve("2", "alice", "cms", "slc4", GiB, 1, **short)
    assert first.queue == "short" and ledger.get("1").queue == "short"
    with pytest.raises(NoCapacity) as refused:
        ledger.reserve("3", "bob", "cms", "slc4", GiB, 1, **short)
    assert refused.value.resource == "slots of queue short" and refused.value.ever_fits
    assert str(refused.value) == "no capacity on this host: slots of queue short exhausted (1 requested, 0 free of 2)"
    assert pickle.loads(pickle.dumps(refused.value)).resource == "slots of queue short"
    assert ledger.get("3") is None
    assert ledger.reserve("2", "alice", "cms", "slc4", GiB, 1, **short).id == ledger.get("2").id  # a re-run: its own
    assert ledger.reserve("3", "bob", "cms", "slc4", GiB, 1, queue="long", queue_slots=1).queue == "long"
    ledger.close("1", Outcome.OK)
    assert ledger.reserve("4", "bob", "cms", "slc4", GiB, 1, **short).queue == "short"  # a closed entry frees its slot


def test_entries_of_other_queues_or_of_no_queue_do_not_count(ledger):
    ledger.reserve("old", "alice", "cms", "slc4", GiB, 1)  # as an older blahvm reserved: no queue
    ledger.reserve("l", "alice", "cms", "slc4", GiB, 1, queue="long")  # long sets no slots_per_host
    assert ledger.get("old").queue is None
    assert ledger.reserve("s", "alice", "cms", "slc4", GiB, 1, queue="short", queue_slots=1).slot == 2
    with pytest.raises(ValueError, match="queue_slots needs the queue"):
        ledger.reserve("x", "alice", "cms", "slc4", GiB, 1, queue_slots=1)
    with pytest.raises(ValueError, match="queue must be a non-empty string"):
        ledger.reserve("x", "alice", "cms", "slc4", GiB, 1, queue="")


def test_a_version_3_ledger_is_migrated_and_its_entries_count_in_no_queue(tmp_path):
    from blahvm.ledger import database

    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(str(state / database.FILENAME), isolation_level=None)
    for version in (0, 1, 2):  # exactly what a blahvm of schema 3 made
        database.MIGRATIONS[version](db)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO entries (job_id, slot, state, user, vo, environment, memory, vcpus, steps, created,"
               " updated, version) VALUES ('old.1', 0, 'running', 'u', 'cms', 'slc4', 1, 1,"
               " '[[\"reserved\", 10.0]]', 10.0, 10.0, 1)")
    db.close()
    with Ledger(host_in(state, max_guests=3)) as ledger:
        (old,) = ledger.live()
        assert old.job_id == "old.1" and old.queue is None and old.state is State.RUNNING
        assert ledger.reserve("new.1", "u", None, "slc4", 1, 1, queue="short", queue_slots=1).slot == 1
        assert ledger.close("old.1", Outcome.OK)
    assert sqlite3.connect(str(state / database.FILENAME)).execute("PRAGMA user_version").fetchone()[0] == 4


def test_a_request_larger_than_the_whole_host_says_so(tmp_path):
    with Ledger(host_in(tmp_path, memory=4 * GiB)) as ledger:
        with pytest.raises(NoCapacity) as refused:
            reserve(ledger, "1", memory=6 * GiB)
    assert not refused.value.ever_fits
    assert str(refused.value) == (
        "no capacity on this host: memory 6GiB requested, but it offers only 4GiB in all"
    )
    assert pickle.loads(pickle.dumps(refused.value)).args == refused.value.args


def test_unlimited_memory_and_vcpus_only_count_guests(tmp_path):
    with Ledger(host_in(tmp_path, max_guests=2)) as ledger:
        reserve(ledger, "1", memory=10**15, vcpus=1000)
        reserve(ledger, "2", memory=10**15, vcpus=1000)
        assert ledger.free() == Capacity(guests=0, memory=None, vcpus=None)
        with pytest.raises(NoCapacity, match="guests exhausted"):
            reserve(ledger, "3", memory=0, vcpus=0)


@pytest.mark.parametrize(
    "arguments, complaint",
    [
        (("", "alice", None, "slc4", GiB, 1), "job_id must be a non-empty string"),
        (("1", "alice", None, "slc4", -1, 1), "memory must be a whole number >= 0"),
        (("1", "alice", None, "slc4", GiB, True), "vcpus must be a whole number >= 0"),
        (("1", None, None, "slc4", GiB, 1), "user must be a non-empty string"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(ledger, arguments, complaint):
    with pytest.raises(ValueError, match=complaint):
        ledger.reserve(*arguments)
    assert ledger.live() == ()


# -- transitions and closing ----------------------------------------------------------------------


def test_transition_is_compare_and_set(ledger):
    reserve(ledger, "101")
    cloning = ledger.transition("101", State.RESERVED, State.CLONING, volumes=["101-root.qcow2"])
    assert cloning.state is State.CLONING and cloning.volumes == ("101-root.qcow2",)
    # A second preparer (or a reaper) that still believes it is reserved loses, changing nothing.
    assert ledger.transition("101", State.RESERVED, State.CLONING, volumes=[]) is None
    assert ledger.get("101") == cloning
    assert ledger.transition("999", LIVE_STATES, State.TEARING_DOWN) is None


def test_transition_sets_fields_and_keeps_a_timestamp_per_step(tmp_path):
    clock = FakeClock()
    with Ledger(host_in(tmp_path), clock=clock) as ledger:
        reserve(ledger, "101")
        clock.now = 1010.0
        ledger.transition("101", "reserved", "cloning", volumes=["a", "b"])
        clock.now = 1025.0
        booting = ledger.transition(
            "101", ["cloning"], "booting", guest="blahvm-101", run_dir="/run/blahvm/101"
        )
        clock.now = 1030.0
        updated = ledger.transition("101", State.BOOTING, State.BOOTING, guest="blahvm-101b")
    assert (booting.guest, booting.run_dir) == ("blahvm-101", "/run/blahvm/101")
    assert updated.guest == "blahvm-101b" and updated.volumes == ("a", "b")
    assert [(s.value, t) for s, t in updated.steps] == [
        ("reserved", 1000.0),
        ("cloning", 1010.0),
        ("booting", 1025.0),
    ]
    assert updated.entered(State.CLONING) == 1010.0 and updated.entered(State.RUNNING) is None
    assert (updated.created, updated.updated) == (1000.0, 1030.0)


def test_expected_version_guards_against_a_change_in_between(ledger):
    seen = reserve(ledger, "101")
    moved = ledger.transition("101", State.RESERVED, State.CLONING, expected_version=seen.version)
    assert moved.version > seen.version
    assert ledger.transition("101", LIVE_STATES, State.TEARING_DOWN, expected_version=seen.version) is None
    assert not ledger.close("101", Outcome.OK, expected_version=seen.version)
    assert ledger.close("101", Outcome.OK, expected_version=moved.version)


def test_close_protects_a_newer_run_of_a_requeued_job(ledger):
    old = reserve(ledger, "101")
    ledger.close("101", Outcome.RETRY_ELSEWHERE)
    reserve(ledger, "101")
    # A late teardown of the old run must not close the new one.
    assert not ledger.close("101", Outcome.OK, expected_version=old.version)
    assert ledger.get("101").live


@pytest.mark.parametrize(
    "old, new",
    [(State.RUNNING, State.BOOTING), (State.RESERVED, State.CLOSED), (State.CLOSED, State.RUNNING)],
)
def test_backward_or_closing_transitions_are_refused(ledger, old, new):
    reserve(ledger, "101")
    with pytest.raises(ValueError):
        ledger.transition("101", old, new)


def test_the_database_itself_refuses_a_second_live_entry_per_slot_or_job(ledger):
    reserve(ledger, "101")
    db = sqlite3.connect(ledger.path)
    insert = (
        "INSERT INTO entries (job_id, slot, state, user, environment, memory, vcpus, created,"
        " updated, version) VALUES (?, ?, 'reserved', 'x', 'y', 1, 1, 0, 0, 1000)"
    )
    for job_id, slot in (("102", 0), ("101", 1)):
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            db.execute(insert, (job_id, slot))
    db.execute(insert.replace("'reserved'", "'closed'"), ("101", 0))  # history may repeat both
    db.commit()


def test_transition_refuses_unknown_or_malformed_fields(ledger):
    reserve(ledger, "101")
    with pytest.raises(ValueError, match="cannot set memory"):
        ledger.transition("101", State.RESERVED, State.CLONING, memory=1)
    with pytest.raises(ValueError, match="volumes must be a list"):
        ledger.transition("101", State.RESERVED, State.CLONING, volumes="root.qcow2")
    assert ledger.get("101").state is State.RESERVED


def test_a_new_owner_pid_records_its_start_time(ledger):
    child = FORK.Process(target=time.sleep, args=(30,))
    child.start()
    try:
        reserve(ledger, "101")
        taken = ledger.transition("101", LIVE_STATES, State.TEARING_DOWN, pid=child.pid)
        assert taken.pid == child.pid and taken.pid_start == process_start_time(child.pid)
        assert owner_alive(taken)
    finally:
        child.kill()
        child.join()
    assert not owner_alive(taken)


def test_owner_alive_tells_a_reused_pid_from_the_owner(ledger):
    entry = reserve(ledger, "101")
    assert owner_alive(entry)
    import attrs

    assert not owner_alive(attrs.evolve(entry, pid_start=entry.pid_start - 1))
    assert not owner_alive(attrs.evolve(entry, pid=None))


def test_close_frees_the_slot_keeps_history_and_is_idempotent(tmp_path):
    clock = FakeClock()
    with Ledger(host_in(tmp_path, max_guests=1), clock=clock) as ledger:
        reserve(ledger, "101")
        with pytest.raises(NoCapacity):
            reserve(ledger, "102")
        clock.now = 1100.0
        assert ledger.close("101", Outcome.FAIL_JOB, "image failed its sha256 check")
        assert not ledger.close("101", Outcome.OK)
        assert not ledger.close("never-seen", Outcome.OK)
        assert ledger.usage() == Usage()
        assert reserve(ledger, "102").slot == 0
        closed = ledger.get("101")
    assert (closed.state, closed.outcome, closed.reason, closed.closed) == (
        State.CLOSED,
        Outcome.FAIL_JOB,
        "image failed its sha256 check",
        1100.0,
    )
    assert closed.entered(State.CLOSED) == 1100.0


def test_record_timing_keeps_phases_in_order_and_replaces_a_repeat(ledger):
    reserve(ledger, "101")
    assert ledger.record_timing("101", "clone", 1.25)
    assert ledger.record_timing("101", "boot", 8)
    assert ledger.record_timing("101", "clone", 1.5)
    ledger.close("101", Outcome.OK)
    assert ledger.record_timing("101", "teardown", 2.0)  # after close: the last run still gets it
    assert ledger.get("101").timings == (("clone", 1.5), ("boot", 8.0), ("teardown", 2.0))
    assert not ledger.record_timing("999", "clone", 1.0)
    with pytest.raises(ValueError, match="not a number of seconds"):
        ledger.record_timing("101", "boot", float("nan"))


def test_history_is_newest_first_and_prune_drops_old_closed_entries(tmp_path):
    clock = FakeClock()
    with Ledger(host_in(tmp_path), clock=clock) as ledger:
        for job_id in ("1", "2", "3"):
            reserve(ledger, job_id)
        for job_id in ("2", "1"):
            clock.now += 100
            ledger.close(job_id, Outcome.OK)
        assert [e.job_id for e in ledger.history()] == ["1", "2"]
        assert [e.job_id for e in ledger.history(limit=1)] == ["1"]
        clock.now += 150  # "2" closed 250 s ago, "1" 150 s ago
        assert ledger.prune(older_than=200) == 1
        assert [e.job_id for e in ledger.history()] == ["1"]
        assert [e.job_id for e in ledger.live()] == ["3"]


def test_entries_survive_reopening(tmp_path):
    host = host_in(tmp_path)
    with Ledger(host) as ledger:
        reserve(ledger, "101")
        written = ledger.transition("101", State.RESERVED, State.RUNNING, guest="g")
    with Ledger(host) as reopened:
        assert reopened.live() == (written,)


# -- the file ---------------------------------------------------------------------------------------


def test_the_ledger_file_and_its_wal_are_private(tmp_path):
    state_dir = tmp_path / "new" / "state"
    with Ledger(host_in(state_dir)) as ledger:
        reserve(ledger, "101")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()}
        journal = sqlite3.connect(ledger.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert modes == {"ledger.sqlite": 0o600, "ledger.sqlite-wal": 0o600, "ledger.sqlite-shm": 0o600}
    assert journal == "wal"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o755


def test_a_ledger_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.touch(mode=0o600)
    path.chmod(0o666)
    with pytest.raises(LedgerError, match=r"writable by group or others \(mode 666\)"):
        Ledger(host_in(tmp_path))


def test_a_corrupt_ledger_gives_a_clear_error(tmp_path):
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not a database, just some text " * 200)
    with pytest.raises(LedgerError, match="ledger .*ledger.sqlite is unreadable"):
        Ledger(host_in(tmp_path))


def test_a_foreign_sqlite_database_is_not_taken_for_a_ledger(tmp_path):
    with sqlite3.connect(tmp_path / "ledger.sqlite") as other:
        other.execute("CREATE TABLE accounts (name TEXT)")
    with pytest.raises(LedgerError, match="not a blahvm ledger"):
        Ledger(host_in(tmp_path))


def test_a_ledger_from_a_newer_blahvm_is_refused(tmp_path):
    Ledger(host_in(tmp_path)).disconnect()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer than this blahvm understands"):
        Ledger(host_in(tmp_path))


def test_a_ledger_path_that_is_a_directory_gives_a_clear_error(tmp_path):
    (tmp_path / "ledger.sqlite").mkdir()
    with pytest.raises(LedgerError, match="cannot be opened"):
        Ledger(host_in(tmp_path))


def test_a_new_ledger_is_put_in_place_whole(tmp_path):
    with Ledger(host_in(tmp_path)) as ledger:
        reserve(ledger, "101")
    assert os.path.getsize(tmp_path / "ledger.sqlite") > 0
    assert sorted(os.listdir(tmp_path)) == ["ledger.sqlite"]  # no temporary file left beside it


def test_a_zero_byte_ledger_is_refused_not_taken_for_a_new_one(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.touch(mode=0o600)
    with pytest.raises(LedgerError, match=r"is empty \(0 bytes\): .*truncated it") as refused:
        Ledger(host_in(tmp_path))
    assert "\n" not in str(refused.value) and "-wal of" not in str(refused.value)
    assert path.stat().st_size == 0


def test_a_zero_byte_ledger_beside_its_wal_keeps_the_wal(tmp_path):
    # SQLite would take the empty file for a new database and delete the -wal (the entries) unread.
    with Ledger(host_in(tmp_path / "before")) as ledger:
        ledger._db.execute("PRAGMA wal_autocheckpoint = 0")
        reserve(ledger, "101")
        for name in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
            shutil.copy(tmp_path / "before" / name, tmp_path / name)
    (tmp_path / "ledger.sqlite").touch(mode=0o600)
    wal = (tmp_path / "ledger.sqlite-wal").read_bytes()
    assert wal
    with pytest.raises(LedgerError, match=f"its -wal of {len(wal)} bytes would be discarded unread"):
        Ledger(host_in(tmp_path))
    assert (tmp_path / "ledger.sqlite-wal").read_bytes() == wal


@pytest.fixture
def small_filesystem(tmp_path):
    """A 512 KiB tmpfs of the test's own, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "blahvm-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory):
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("when", ["opening", "writing"])
def test_a_full_state_dir_says_no_space_and_keeps_the_ledger(small_filesystem, when):
    host = host_in(small_filesystem / "state", max_guests=50)
    with Ledger(host) as ledger:
        reserve(ledger, "101")
    expected = r"cannot be written: no space left on the filesystem of .*state .*: free some space; " \
               r"the ledger is intact .*do not move it aside"
    if when == "opening":
        fill(small_filesystem)
        with pytest.raises(LedgerError, match=expected) as refused:
            Ledger(host)
    else:
        with Ledger(host) as ledger, pytest.raises(LedgerError, match=expected) as refused:
            fill(small_filesystem)
            for job in range(200):  # until the WAL cannot grow
                reserve(ledger, f"job-{job}", memory=1)
    assert "move it aside, then" not in str(refused.value) and "unreadable" not in str(refused.value)
    os.unlink(small_filesystem / "filler")
    with Ledger(host) as ledger:
        assert ledger.get("101").state is State.RESERVED  # the ledger was right not to be discarded


def test_a_read_only_state_dir_says_so(small_filesystem):
    host = host_in(small_filesystem / "state")
    with Ledger(host) as ledger:
        reserve(ledger, "101")
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    with pytest.raises(LedgerError, match=r"(?i)read-only") as refused:
        with Ledger(host) as ledger:
            reserve(ledger, "102")
    assert "move it aside" not in str(refused.value)


def test_an_io_error_is_not_called_a_damaged_ledger(tmp_path):
    from blahvm.ledger.database import describe

    Ledger(host_in(tmp_path)).disconnect()
    said = describe(str(tmp_path / "ledger.sqlite"), sqlite3.OperationalError("disk I/O error"))
    assert said.startswith(f"ledger {tmp_path}/ledger.sqlite: I/O error (disk I/O error): check the disk")
    assert "do not move the ledger aside" in said and "move it aside, then" not in said


# -- concurrency and crashes ------------------------------------------------------------------------


def _reserve_after_barrier(host, job_id, memory, vcpus, barrier, results, queue=None, queue_slots=None):
    barrier.wait()
    try:
        with Ledger(host) as ledger:
            entry = ledger.reserve(job_id, "alice", "cms", "slc4", memory, vcpus, queue=queue, queue_slots=queue_slots)
        results.put((job_id, "ok", entry.slot))
    except NoCapacity as refused:
        results.put((job_id, "full", refused.resource))
    except Exception as error:  # reported to the test rather than lost in a child process
        results.put((job_id, "error", repr(error)))


def _race(host, processes, memory, vcpus, queue=None, queue_slots=None):
    barrier, results = FORK.Barrier(processes), FORK.Queue()
    children = [
        FORK.Process(
            target=_reserve_after_barrier, args=(host, str(n), memory, vcpus, barrier, results, queue, queue_slots)
        )
        for n in range(processes)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    return outcomes


@pytest.mark.parametrize(
    "limits, memory, vcpus, exhausted",
    [
        (dict(max_guests=3), GiB, 1, "guests"),
        (dict(max_guests=12, memory=10 * GiB), 3 * GiB, 1, "memory"),
        (dict(max_guests=12, vcpus=7), GiB, 2, "vcpus"),
    ],
)
def test_concurrent_prologues_never_over_commit(tmp_path, limits, memory, vcpus, exhausted):
    host = host_in(tmp_path / "fresh", **limits)  # a brand-new ledger: its creation races too
    outcomes = _race(host, 12, memory, vcpus)
    assert [o for o in outcomes if o[1] == "error"] == []
    won = sorted(o[2] for o in outcomes if o[1] == "ok")
    assert won == [0, 1, 2]
    assert {o[2] for o in outcomes if o[1] == "full"} == {exhausted}
    with Ledger(host) as ledger:
        assert ledger.usage() == Usage(guests=3, memory=Size(3 * memory), vcpus=3 * vcpus)


def test_concurrent_prologues_never_over_commit_a_queues_slots_per_host(tmp_path):
    host = host_in(tmp_path / "fresh", max_guests=12)  # the host has room: the queue is the limit
    outcomes = _race(host, 10, GiB, 1, queue="short", queue_slots=3)
    assert [o for o in outcomes if o[1] == "error"] == []
    assert sorted(o[2] for o in outcomes if o[1] == "ok") == [0, 1, 2]
    assert {o[2] for o in outcomes if o[1] == "full"} == {"slots of queue short"}
    with Ledger(host) as ledger:
        assert [entry.queue for entry in ledger.live()] == ["short"] * 3


def _wipe_without_committing(host, holding):
    ledger = Ledger(host)
    with ledger._write() as db:
        db.execute("DELETE FROM entries")
        db.execute(
            "INSERT INTO entries (job_id, slot, state, user, environment, memory, vcpus, created,"
            " updated, version) VALUES ('intruder', 0, 'running', 'x', 'y', 1, 1, 0, 0, 1000)"
        )
        holding.set()
        time.sleep(60)


def _reserve_stuck_before_insert(host, holding):
    def clock():
        holding.set()
        time.sleep(60)

    Ledger(host, clock=clock).reserve("stuck", "alice", "cms", "slc4", GiB, 1)


@pytest.mark.parametrize("victim", [_wipe_without_committing, _reserve_stuck_before_insert])
def test_a_process_killed_inside_a_transaction_leaves_the_ledger_unchanged(tmp_path, victim):
    host = host_in(tmp_path, max_guests=2)
    with Ledger(host) as ledger:
        reserve(ledger, "101")
        before = ledger.live()
    holding = FORK.Event()
    child = FORK.Process(target=victim, args=(host, holding))
    child.start()
    try:
        assert holding.wait(timeout=10)
        with Ledger(host, busy_timeout=0.2) as impatient:
            with pytest.raises(LedgerBusy, match="stayed locked by another process"):
                reserve(impatient, "102")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    with Ledger(host, busy_timeout=5) as ledger:
        assert ledger.live() == before
        assert ledger.get("stuck") is None and ledger.get("intruder") is None
        started = time.monotonic()
        assert reserve(ledger, "102").slot == 1
        assert time.monotonic() - started < 1
        assert sqlite3.connect(ledger.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- rules, by property -----------------------------------------------------------------------------

hosts = st.builds(
    HostConfig,
    max_guests=st.integers(0, 6),
    memory=st.none() | st.integers(0, 16).map(lambda g: Size(g * GiB)),
    vcpus=st.none() | st.integers(0, 8),
)
usages = st.builds(
    Usage,
    guests=st.integers(0, 8),
    memory=st.integers(0, 20).map(lambda g: Size(g * GiB)),
    vcpus=st.integers(0, 10),
)


@given(hosts, usages, st.integers(0, 20).map(lambda g: Size(g * GiB)), st.integers(0, 10))
def test_a_request_fits_exactly_when_it_is_within_what_is_free(host, usage, memory, vcpus):
    free = free_capacity(host, usage)
    expected = (
        free.guests >= 1
        and (free.memory is None or memory <= free.memory)
        and (free.vcpus is None or vcpus <= free.vcpus)
    )
    try:
        check_fits(host, usage, memory, vcpus)
        fits = True
    except NoCapacity as refused:
        fits = False
        assert refused.resource in ("guests", "memory", "vcpus")
    assert fits == expected


@given(st.sets(st.integers(0, 20)))
def test_the_lowest_free_slot_is_the_smallest_untaken_number(taken):
    slot = lowest_free_slot(taken)
    assert slot not in taken and all(n in taken for n in range(slot))


@given(st.sampled_from(list(State)), st.sampled_from(list(State)))
def test_states_only_move_forward(old, new):
    order = list(State)
    assert may_follow(old, new) == (
        State.CLOSED not in (old, new) and order.index(new) >= order.index(old)
    )


JOBS = st.sampled_from(["1", "2", "3", "4", "5"])
LIVE = sorted(LIVE_STATES, key=list(State).index)


class LedgerAgainstModel(RuleBasedStateMachine):
    """Random reserve/transition/close sequences agree with a dict of live jobs."""

    HOST = HostConfig(max_guests=3, memory=Size(6 * GiB), vcpus=4)

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="ledger-model-")
        self.ledger = Ledger(self.HOST, path=os.path.join(self.directory, "ledger.sqlite"))
        self.model = {}  # job id -> [state, memory, vcpus]

    def teardown(self):
        self.ledger.disconnect()
        shutil.rmtree(self.directory)

    @rule(job=JOBS, memory=st.integers(0, 4).map(lambda g: g * GiB), vcpus=st.integers(0, 3))
    def reserve(self, job, memory, vcpus):
        if job in self.model:
            entry = self.ledger.reserve(job, "u", None, "e", memory, vcpus)
            assert [entry.state, entry.memory, entry.vcpus] == self.model[job]
            return
        held = list(self.model.values())
        fits = (
            len(held) < self.HOST.max_guests
            and sum(m for _, m, _ in held) + memory <= self.HOST.memory
            and sum(v for _, _, v in held) + vcpus <= self.HOST.vcpus
        )
        if fits:
            entry = self.ledger.reserve(job, "u", None, "e", memory, vcpus)
            assert entry.state is State.RESERVED
            self.model[job] = [State.RESERVED, memory, vcpus]
        else:
            try:
                self.ledger.reserve(job, "u", None, "e", memory, vcpus)
            except NoCapacity:
                pass
            else:
                raise AssertionError(f"reserved {job} on a full host")

    @rule(job=JOBS, expected=st.sets(st.sampled_from(LIVE), min_size=1), new=st.sampled_from(LIVE))
    def transition(self, job, expected, new):
        if not all(may_follow(old, new) for old in expected):
            try:
                self.ledger.transition(job, expected, new)
            except ValueError:
                return
            raise AssertionError("a backward transition was accepted")
        moved = self.ledger.transition(job, expected, new, guest=f"guest-{job}")
        should_move = job in self.model and self.model[job][0] in expected
        assert (moved is not None) == should_move
        if should_move:
            assert moved.state is new and moved.guest == f"guest-{job}"
            self.model[job][0] = new

    @rule(job=JOBS)
    def close(self, job):
        assert self.ledger.close(job, Outcome.OK) == (job in self.model)
        self.model.pop(job, None)

    @rule()
    def reopen(self):
        self.ledger.disconnect()
        self.ledger = Ledger(self.HOST, path=os.path.join(self.directory, "ledger.sqlite"))

    @invariant()
    def live_entries_match_the_model(self):
        live = self.ledger.live()
        assert {e.job_id: [e.state, e.memory, e.vcpus] for e in live} == self.model
        slots = [e.slot for e in live]
        assert len(set(slots)) == len(slots) and all(0 <= s < self.HOST.max_guests for s in slots)
        usage = self.ledger.usage()
        assert usage == Usage(
            guests=len(self.model),
            memory=Size(sum(m for _, m, _ in self.model.values())),
            vcpus=sum(v for _, _, v in self.model.values()),
        )
        assert usage.memory <= self.HOST.memory and usage.vcpus <= self.HOST.vcpus


LedgerAgainstModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
TestLedgerAgainstModel = LedgerAgainstModel.TestCase


def test_a_zombie_owner_counts_as_dead():
    child = subprocess.Popen(["true"])
    try:
        for _ in range(500):  # until it has exited but is not yet collected
            with open(f"/proc/{child.pid}/stat", "rb") as status:
                if status.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert process_start_time(child.pid) is None
    finally:
        child.wait()
    assert process_start_time(os.getpid()) is not None
