"""The host side of the guest's control port: root tells the agent whose job the guest runs.

The port ``org.blahvm.control`` has its host end in a socket only root can reach (never handed to
the job's user). Over it ``prepare`` binds the payload's identity once the agent answers; from then
on the agent runs payloads as that identity only, whatever an exec request on the job's own sockets
asks for (docs/agent.md, docs/security.md). The first bind wins for the guest's life.
"""

from __future__ import annotations

import os
import time
from typing import Tuple

import attrs

from blahvm.guest.agent import CONTROL_PORT
from blahvm.guest.client import AgentError, open_session
from blahvm.guest.protocol import encode_control

__all__ = ["CONTROL_PORT", "Identity", "bind"]


@attrs.frozen
class Identity:
    """Who the job's payload runs as in its guest, as root decided it."""

    uid: int
    gid: int
    groups: Tuple[int, ...] = attrs.field(converter=lambda groups: tuple(sorted(set(groups))))
    root: bool = False  # the environment lets a payload ask for uid 0

    @classmethod
    def of_user(cls, user: str, uid: int, gid: int, root: bool = False) -> "Identity":
        """The identity of ``user``: its supplementary groups from this host's group database."""
        try:
            groups = os.getgrouplist(user, gid)
        except (OSError, ValueError):  # a name the database cannot look up: its primary group alone
            groups = [gid]
        return cls(uid, gid, (*groups, gid), root)

    def message(self) -> dict:
        return {"uid": self.uid, "gid": self.gid, "groups": list(self.groups), "root": self.root}


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
