"""Routing from a cold start: the compiled route table, cached beside nothing it can't trust.

Every job submission starts a fresh interpreter (esub, queuejob, job_submit), and importing
yaml and attrs alone would cost more than the interpreter itself. So the table compiled from a
config is kept as a marshal file in a cache directory, keyed by the config's path and checked
against the config's exact bytes and blahvm's version; a stale or missing entry falls back to
the full loader (which also writes the entry back when it may). Only entries owned by root or
by the current user, and writable by no one else, are ever read.
"""

from __future__ import annotations

import marshal
import os
import stat
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

from blahvm._version import __version__
from blahvm.locations import DEFAULT_CACHE_DIR
from blahvm.routing.table import FORMAT, RouteTable


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def cache_file(cache_dir: str, config_path: str) -> str:
    key = os.path.abspath(config_path).replace("%", "%25").replace("/", "%2F")
    return os.path.join(cache_dir, f"routes-{key[-200:]}.marshal")


def _read_cache(path: str, config_path: str, raw: bytes) -> Optional[tuple]:
    try:
        with open(path, "rb") as stream:
            if not (_trusted(os.fstat(stream.fileno())) and _trusted(os.stat(os.path.dirname(path)))):
                return None
            entry = marshal.load(stream)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if isinstance(entry, tuple) and entry[:4] == (FORMAT, __version__, os.path.abspath(config_path), raw):
        return entry[4]
    return None


def write_cache(cache_dir: str, config_path: str, raw: bytes, data: tuple) -> bool:
    """Store a compiled table; False (and no harm done) where the directory is not ours to write."""
    path = cache_file(cache_dir, config_path)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(cache_dir, mode=0o755, exist_ok=True)
        if not _trusted(os.stat(cache_dir)):
            return False
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as stream:
            marshal.dump((FORMAT, __version__, os.path.abspath(config_path), raw, data), stream)
        os.replace(temporary, path)
        return True
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False


def load_table(config_path: str, cache_dir: Optional[str] = DEFAULT_CACHE_DIR) -> RouteTable:
    """The route table for a config file; raises ConfigError (from the full loader) if it is bad."""
    try:
        with open(config_path, "rb") as stream:
            raw = stream.read()
    except OSError:
        raw = None
    if raw is not None and cache_dir:
        data = _read_cache(cache_file(cache_dir, config_path), config_path, raw)
        if data is not None:
            return RouteTable(data)
    # slow path: the full, strict loader (it reports an unreadable file properly)
    from blahvm.config import load_config, parse_config
    from blahvm.routing.table import compile_table

    config = load_config(config_path) if raw is None else parse_config(raw, config_path)
    data = compile_table(config)
    if cache_dir:
        write_cache(cache_dir, config_path, raw, data)
    return RouteTable(data)
