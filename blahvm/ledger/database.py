"""The ledger's SQLite file: safe creation, WAL mode, schema version and migrations."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import tempfile
import time
from typing import Callable, Dict

from blahvm.ledger.errors import LedgerBusy, LedgerError

FILENAME = "ledger.sqlite"
SCHEMA_VERSION = 4

_SCHEMA_V1 = """
CREATE TABLE entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    state       TEXT NOT NULL,
    user        TEXT NOT NULL,
    vo          TEXT,
    environment TEXT NOT NULL,
    memory      INTEGER NOT NULL,
    vcpus       INTEGER NOT NULL,
    guest       TEXT,
    volumes     TEXT NOT NULL DEFAULT '[]',
    run_dir     TEXT,
    pid         INTEGER,
    pid_start   INTEGER,
    steps       TEXT NOT NULL DEFAULT '[]',
    timings     TEXT NOT NULL DEFAULT '[]',
    outcome     TEXT,
    reason      TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    closed      REAL,
    version     INTEGER NOT NULL
);
-- The invariants hold in the database itself, whatever code writes to it:
-- one live entry per batch job, and no slot held twice.
CREATE UNIQUE INDEX entries_live_job ON entries(job_id) WHERE state != 'closed';
CREATE UNIQUE INDEX entries_live_slot ON entries(slot) WHERE state != 'closed';
CREATE INDEX entries_closed ON entries(closed) WHERE state = 'closed';
-- Every write takes the next number, so an entry's version never repeats, not even in a new run
-- of the same job: a stale version can never match.
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('version', 0);
"""


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            db.execute(statement)


def _unique_live_guest(db: sqlite3.Connection) -> None:
    # A static guest is leased to one live entry at a time (blahvm's own guest names are per job).
    db.execute("CREATE UNIQUE INDEX entries_live_guest ON entries(guest) WHERE state != 'closed'")


def _usage_columns(db: sqlite3.Connection) -> None:
    # What the job's guest used (accounting): NULL where unknown, so entries made before are untouched.
    for column in ("cpu_seconds REAL", "vcpu_seconds REAL", "max_memory INTEGER", "disk_read INTEGER",
                   "disk_write INTEGER", "usage_note TEXT"):
        db.execute(f"ALTER TABLE entries ADD COLUMN {column}")


def _queue_column(db: sqlite3.Connection) -> None:
    # The queue the job was routed to, for its slots_per_host: NULL in entries made before (no queue counts them).
    db.execute("ALTER TABLE entries ADD COLUMN queue TEXT")


# MIGRATIONS[n] brings a ledger from schema version n to n + 1, inside the caller's transaction.
# To change the schema: add MIGRATIONS[SCHEMA_VERSION] and increment SCHEMA_VERSION.
MIGRATIONS: Dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _create_v1,
    1: _unique_live_guest,
    2: _usage_columns,
    3: _queue_column,
}


def ledger_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILENAME)


def prepare_file(path: str, busy_timeout: float = 30.0) -> None:
    """Create the ledger file 0600 (SQLite gives its -wal and -shm files the same mode) and check it.

    A missing directory is created 0755, not 0700: the state directory usually also holds images and
    clones, which the hypervisor's own user must be able to reach. The ledger file itself stays private.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        _refuse_if_writable_by_others(directory, os.stat(directory))
        if not os.path.lexists(path):
            _create(path, directory, busy_timeout)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise LedgerError(f"ledger {path} cannot be opened: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(f"ledger {path} is not a regular file")
    _refuse_if_writable_by_others(path, info)
    if info.st_size == 0:
        _refuse_empty(path)


def _create(path: str, directory: str, busy_timeout: float) -> None:
    """Make a new ledger whole under a temporary name, then link it into place.

    So no ledger is ever seen empty: a 0-byte ledger.sqlite was truncated by something else, and is
    refused rather than silently taken for a new one (the entries of the running jobs are gone).
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{FILENAME}.new-", dir=directory)  # mode 0600
    os.close(fd)
    try:
        with translated_errors(path):
            db = sqlite3.connect(temporary, timeout=busy_timeout, isolation_level=None)
            try:
                _use_wal(db, busy_timeout)
                db.execute("PRAGMA synchronous=FULL")
                migrate(db, path)
            finally:
                db.close()  # the last connection: SQLite checkpoints into the file and removes -wal, -shm
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: that one is used
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    finally:
        for leftover in (temporary, temporary + "-wal", temporary + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _refuse_empty(path: str) -> None:
    try:
        wal = os.stat(path + "-wal").st_size
    except OSError:
        wal = 0
    # SQLite itself would take a 0-byte file for a new database, and delete a -wal beside it unread.
    beside = f", and its -wal of {wal} bytes would be discarded unread" if wal else ""
    raise LedgerError(
        f"ledger {path} is empty (0 bytes): blahvm never puts an empty ledger in place, so something truncated "
        f"it and the entries of this host's jobs are lost{beside}. To start a new ledger, move it (with its "
        "-wal and -shm) aside; then 'blahvm guests' lists the guests of jobs still running, which 'blahvm reap' "
        "would remove"
    )


def _refuse_if_writable_by_others(path: str, info: os.stat_result) -> None:
    sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        raise LedgerError(
            f"ledger {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}): "
            "make it writable by its owner only (chmod go-w)"
        )


def connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """An open, migrated ledger in WAL mode; transactions are begun explicitly by the caller."""
    prepare_file(path, busy_timeout)
    with translated_errors(path):
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        with translated_errors(path):
            db.row_factory = sqlite3.Row
            _use_wal(db, busy_timeout)
            db.execute("PRAGMA synchronous=FULL")  # a committed reservation survives a power cut
            migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    # Switching a new file to WAL needs a moment of exclusive access and does not always wait for
    # it: retry until the busy timeout when many hooks open a brand-new ledger together.
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (still {mode})")


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the schema to ``SCHEMA_VERSION``, in one transaction; refuse a newer one."""
    if _version(db) == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _version(db)  # another process may have migrated while this one waited
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {path} has schema version {version}, newer than this blahvm "
                f"understands ({SCHEMA_VERSION}): upgrade blahvm on this host"
            )
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise LedgerError(f"{path} is an SQLite database but not a blahvm ledger: move it aside")
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version = {int(version)}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _is_busy(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


class translated_errors:
    """Turn SQLite's exceptions into ``LedgerError`` / ``LedgerBusy`` that name the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or not isinstance(error, sqlite3.Error):
            return False
        if isinstance(error, sqlite3.OperationalError) and _is_busy(error):
            raise LedgerBusy(
                f"ledger {self.path} stayed locked by another process past the busy timeout: "
                "retry, and look for a hung blahvm hook"
            ) from None
        if isinstance(error, sqlite3.IntegrityError):
            raise LedgerError(f"ledger {self.path} refused an inconsistent write ({error})") from None
        raise LedgerError(describe(self.path, error)) from None


# SQLite's primary result codes (the low byte of an extended one) that say what went wrong
_PERM, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 8, 10, 11, 13, 14, 26
_BY_TEXT = (("disk is full", _FULL), ("disk i/o error", _IOERR), ("readonly database", _READONLY),
            ("unable to open", _CANTOPEN), ("not a database", _NOTADB), ("malformed", _CORRUPT))
_LOW_SPACE = 1024 * 1024  # less than this free: a WAL frame or the -shm may well not fit
_INTACT = "the ledger is intact (SQLite wrote nothing half-way): do not move it aside"


def describe(path: str, error: sqlite3.Error) -> str:
    """One line saying what is wrong with the ledger; moving it aside is advised only when it is damaged.

    Moving a ledger aside makes the next reap remove every guest it recorded, so a full disk, an I/O
    error or a permission problem must never read like a damaged ledger.
    """
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        primary, name = code & 0xFF, getattr(error, "sqlite_errorname", str(code))
    else:
        text = str(error).lower()
        primary = next((known for words, known in _BY_TEXT if words in text), None)
        name = str(error)
    directory = os.path.dirname(os.path.abspath(path))
    intact = f"; {_INTACT}" if os.path.lexists(path) else ""  # else it was being made
    if primary in (_CORRUPT, _NOTADB):
        return (f"ledger {path} is unreadable ({error}): "
                "move it aside, then 'blahvm reap' removes the guests nothing owns")
    if primary in (_FULL, _IOERR):
        short = _short_of_space(directory)
        if short or primary == _FULL:
            return f"ledger {path} cannot be written: {short or 'the disk is full'} ({name}): free some space{intact}"
        return (f"ledger {path}: I/O error ({name}): check the disk and the filesystem of {directory} "
                f"(e.g. dmesg); do not move the ledger aside, it records the guests of the running jobs")
    if primary in (_READONLY, _CANTOPEN, _PERM):
        return f"ledger {path} cannot be written: {_why_not_writable(path, directory)} ({name}){intact}"
    return f"ledger {path}: {error}"


def _short_of_space(directory: str) -> str:
    """What the filesystem lacks, or ''."""
    try:
        info = os.statvfs(directory)
    except OSError:
        return ""
    free = (info.f_bavail if os.geteuid() else info.f_bfree) * info.f_frsize  # root may use reserved blocks
    if free < _LOW_SPACE:
        return f"no space left on the filesystem of {directory} ({free // 1024} KiB free)"
    if info.f_files and (info.f_favail if os.geteuid() else info.f_ffree) == 0:
        return f"no free inodes on the filesystem of {directory}"
    return ""


def _why_not_writable(path: str, directory: str) -> str:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"the filesystem of {directory} is mounted read-only"
    except OSError:
        pass
    for where in (directory, path):
        if os.path.exists(where) and not os.access(where, os.W_OK):
            return f"permission denied on {where} (run as its owner)"
    return "it cannot be opened for writing"
