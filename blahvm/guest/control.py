"""The host side of the guest's control port: root tells the agent whose job the guest runs.

The port ``org.blahvm.control`` has its host end in a socket only root can reach (never handed to
the job's user). Over it ``prepare`` binds the payload's identity once the agent answers; from then
on the agent runs payloads as that identity only, whatever an exec request on the job's own sockets
asks for (docs/agent.md, docs/security.md). The first bind wins for the guest's life.
"""

from __future__ import annotations

import grp
import os
import time
from typing import Optional, Tuple

import attrs

from blahvm.guest.agent import ACCOUNT_NAME, CONTROL_PORT, HOSTNAME
from blahvm.guest.client import AgentError, open_session
from blahvm.guest.protocol import encode_control

__all__ = ["CONTROL_PORT", "Identity", "bind", "mount", "refresh"]

ENTROPY_BYTES = 64  # handed to a restored guest's RNG: twice what its generator needs to reseed


@attrs.frozen
class Identity:
    """Who the job's payload runs as in its guest, as root decided it."""

    uid: int
    gid: int
    groups: Tuple[int, ...] = attrs.field(converter=lambda groups: tuple(sorted(set(groups))))
    root: bool = False  # the environment lets a payload ask for uid 0
    # names the guest learns, so `id -un` works there (the agent adds them where the image has none)
    user: Optional[str] = None
    group: Optional[str] = None
    hostname: Optional[str] = None

    @classmethod
    def of_user(cls, user: str, uid: int, gid: int, root: bool = False, hostname: Optional[str] = None) -> "Identity":
        """The identity of ``user``: its supplementary groups and group name from this host's
        database; names the guest's agent would refuse are left out."""
        try:
            groups = os.getgrouplist(user, gid)
        except (OSError, ValueError):  # a name the database cannot look up: its primary group alone
            groups = [gid]
        try:
            group = grp.getgrgid(gid).gr_name
        except (KeyError, OverflowError):
            group = None
        return cls(uid, gid, (*groups, gid), root, _plain(user, ACCOUNT_NAME), _plain(group, ACCOUNT_NAME),
                   _plain(hostname, HOSTNAME))

    def message(self) -> dict:
        message = {"uid": self.uid, "gid": self.gid, "groups": list(self.groups), "root": self.root}
        for key in ("user", "group", "hostname"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


def _plain(name: Optional[str], pattern) -> Optional[str]:
    return name if name is not None and pattern.match(name) else None


def bind(socket_path: str, identity: Identity, timeout: float) -> None:
    """Bind ``identity`` in the guest behind the control socket ``socket_path``, waiting up to
    ``timeout`` seconds for its agent. AgentError if the agent refuses (another identity is bound)."""
    deadline = time.monotonic() + timeout
    connection, hello = open_session(socket_path, timeout)
    try:
        connection.send(encode_control({"type": "bind", "session": hello.session, **identity.message()}))
        answer = connection.next_control(deadline, "its answer to the bind")
    finally:
        connection.close()
    if answer.get("type") != "bound" or {k: answer.get(k) for k in identity.message()} != identity.message():
        raise AgentError(f"agent at {socket_path} answered the bind with {answer!r}")


def refresh(socket_path: str, timeout: float) -> None:
    """Hand the guest behind ``socket_path`` this host's clock and fresh entropy (a guest restored
    from a saved state has the state's); AgentError if the agent cannot take them."""
    deadline = time.monotonic() + timeout
    connection, hello = open_session(socket_path, timeout)
    try:
        request = {"type": "refresh", "session": hello.session, "time": time.time(),
                   "entropy": os.urandom(ENTROPY_BYTES).hex()}
        connection.send(encode_control(request))
        answer = connection.next_control(deadline, "its answer to the refresh")
    finally:
        connection.close()
    if answer.get("type") != "refreshed":
        raise AgentError(f"agent at {socket_path} answered the refresh with {answer!r}")


def mount(socket_path: str, tag: str, path: str, timeout: float) -> None:
    """Have the guest behind ``socket_path`` mount the virtiofs ``tag`` at ``path`` (nosuid,nodev),
    as stage two of a boot would: for a share hot-plugged after a restore, before the bind.
    AgentError if the agent cannot (it waits a while for the device to appear)."""
    deadline = time.monotonic() + timeout
    connection, hello = open_session(socket_path, timeout)
    try:
        connection.send(encode_control({"type": "mount", "session": hello.session, "tag": tag, "path": path}))
        answer = connection.next_control(deadline, "its answer to the mount")
    finally:
        connection.close()
    if answer.get("type") != "mounted" or (answer.get("tag"), answer.get("path")) != (tag, path):
        raise AgentError(f"agent at {socket_path} answered the mount with {answer!r}")
