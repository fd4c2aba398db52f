"""Whether only root can change what a path names: for the files and directories root acts on.

A path is as safe as the least safe directory on the way to it: whoever can write any of them can
rename an entry and put a symlink or a file of their own in its place. ``directory_problem`` walks
the directories of a path from ``/`` as the kernel resolves them (a symlink on the way is followed,
and must itself be root's) and says which one someone other than root could change.

A sticky directory writable by all (``/tmp``) passes: in it nobody but root can rename or remove
what root owns, and every entry on the way is checked to be root's. Stdlib only.
"""

from __future__ import annotations

import os
import stat
from typing import List, Optional

ROOT = 0
_MAX_LINKS = 40  # as the kernel's ELOOP limit


def status_problem(status: os.stat_result, sticky_ok: bool = True) -> Optional[str]:
    """Why someone other than root could change the file or directory of ``status``, as a predicate
    ("is owned by uid 1000, not root"), or None. ``sticky_ok=False``: no new entries by others either."""
    if status.st_uid != ROOT:
        return f"is owned by uid {status.st_uid}, not root"
    sticky = sticky_ok and stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        return f"is writable by group or others (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def directory_problem(directory: str) -> Optional[str]:
    """Why someone other than root could change ``directory`` or one on its way, or None.

    Raises OSError when a component is missing or cannot be looked at.
    """
    if not os.path.isabs(directory):
        return f"{directory!r} is not an absolute path"
    current, pending, links = "/", _parts(directory), 0
    problem = _directory_status_problem("/", os.lstat("/"))
    while pending and problem is None:
        name = pending.pop(0)
        if name == "..":
            current = os.path.dirname(current)  # ``current`` never holds a symlink: as the kernel
            continue
        candidate = os.path.join(current, name)
        status = os.lstat(candidate)
        if stat.S_ISLNK(status.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return f"{directory} has too many symbolic links on its way"
            if status.st_uid != ROOT:
                return f"symbolic link {candidate} is owned by uid {status.st_uid}, not root"
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending[:0] = _parts(target)
            continue
        problem = _directory_status_problem(candidate, status)
        current = candidate
    return problem


def _directory_status_problem(path: str, status: os.stat_result) -> Optional[str]:
    if not stat.S_ISDIR(status.st_mode):
        return f"{path} is not a directory"
    problem = status_problem(status)
    return None if problem is None else f"directory {path} {problem}"


def _parts(path: str) -> List[str]:
    return [part for part in path.split("/") if part not in ("", ".")]
