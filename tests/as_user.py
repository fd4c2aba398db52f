"""Play another user in tests: run a function in a forked child that really is that user.

The child drops to the user's uid, gid and supplementary groups (as QEMU does under libvirt) and
reports back one word: what the function returned, or the name of the error it raised.
"""

from __future__ import annotations

import os
import pwd
from typing import Callable


def run_as(user: str, action: Callable[[], str]) -> str:
    """``action()`` run as ``user`` in a forked child; its result, or e.g. ``PermissionError``."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            try:
                word = action()
            except Exception as error:  # noqa: BLE001 (the error's name is the answer)
                word = type(error).__name__
            os.write(write, str(word).encode()[:4000])
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def write_at(path: str, offset: int, data: bytes) -> Callable[[], str]:
    """An action that writes ``data`` into ``path`` at ``offset`` (without truncating it), first
    making the file writable where it can (an owner can, whatever the mode)."""

    def action() -> str:
        try:
            os.chmod(path, 0o600)
        except PermissionError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        return "written"

    return action
