"""The cloud-init documents of a job's seed, built as data and dumped with ``yaml.safe_dump``:
nothing here pastes text into YAML or a shell line.

What blahvm writes (docs/images.md, "What blahvm puts into each seed"):

- meta-data: an ``instance-id`` unique to the job's guest, and ``local-hostname``;
- user-data (``#cloud-config``): the hostname; ``users: []`` (no default user with sudo: the job's
  uid must never be an image account's); the agent at ``AGENT_PATH`` (gzip+base64) and a systemd
  unit that runs it on the agent ports, started with ``--no-block`` as the last command so the
  site's own commands have run before the job can; the job's group and user with their numeric ids,
  made by list-form commands (words, never a shell line), no password, no keys, no sudo; then the
  site's additions (``user_data:``, checked by ``blahvm.config.cloud_config``).

A seed without a job (``JobContext`` with no user) carries the agent and the site's additions only:
the bind over the control port gives a guest its user and hostname (``blahvm.guest.control``).
"""

from __future__ import annotations

import base64
import gzip
import os
import re
from typing import Any, Dict, List, Optional

import attrs
import yaml

from blahvm.config.cloud_config import AGENT_UNIT, AGENT_UNIT_PATH, BLAHVM_GUEST_DIR, OWNED, additions
from blahvm.guest.agent import ACCOUNT_NAME, HOSTNAME
from blahvm.image.guest_init import AGENT_PATH, AGENT_PORTS

_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
GUEST_PYTHON = "/usr/bin/python3"  # cloud-init itself runs on it in every image that has cloud-init
JOB_HOME = "/tmp"  # as the agent's bind makes the user: no home directory is made in the guest
JOB_SHELL = "/bin/sh"

if not AGENT_PATH.startswith(BLAHVM_GUEST_DIR):  # the config refuses a site's files there
    raise ImportError(f"the agent's path {AGENT_PATH} is outside {BLAHVM_GUEST_DIR}")


@attrs.frozen
class JobContext:
    """Who and what one seed is for. Without ``user``, a seed for no job in particular."""

    instance_id: str
    hostname: str
    user: Optional[str] = None
    group: Optional[str] = None
    uid: Optional[int] = None
    gid: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.instance_id, str) or not _INSTANCE_ID.match(self.instance_id):
            raise ValueError(f"instance id {self.instance_id!r} is not a plain name")
        if not isinstance(self.hostname, str) or not HOSTNAME.match(self.hostname):
            raise ValueError(f"hostname {self.hostname!r} is not one DNS label")
        for what in ("user", "group"):
            name = getattr(self, what)
            if name is not None and (not isinstance(name, str) or not ACCOUNT_NAME.match(name)):
                raise ValueError(f"{what} name {name!r} is not a plain account name")
        for what in ("uid", "gid"):
            number = getattr(self, what)
            if number is not None and (isinstance(number, bool) or not isinstance(number, int)
                                       or not 0 <= number < 2**32 - 1):
                raise ValueError(f"{what} {number!r} is not a numeric id")
        if self.user is not None and (self.uid is None or self.gid is None):
            raise ValueError("a job's user needs its uid and gid")


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096)


def meta_data(context: JobContext) -> str:
    return _dump({"instance-id": context.instance_id, "local-hostname": context.hostname})


def agent_source() -> bytes:
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guest", "agent.py"),
              "rb") as stream:
        return stream.read()


def agent_unit() -> str:
    """The systemd unit of the agent: no shell, no specifiers, nothing but fixed words."""
    return (
        "[Unit]\n"
        "Description=blahvm guest agent: runs the batch job's payload\n"
        "\n"
        "[Service]\n"
        f"ExecStart={GUEST_PYTHON} {AGENT_PATH} --port {AGENT_PORTS}\n"
    )


def _identity_commands(context: JobContext) -> List[List[str]]:
    """groupadd and useradd as words: the job's primary group by its gid, then the user by its uid,
    with no home, no password (locked), no keys, no other group. Where the image has the group's
    gid already, groupadd fails and useradd joins the group of that gid; where it has the uid,
    useradd fails and the agent's bind finds the uid taken (a site's image ought not to)."""
    if context.user is None:
        return []
    commands = []
    if context.group is not None and context.gid != 0:
        commands.append(["groupadd", "--gid", str(context.gid), context.group])
    if context.uid != 0:
        commands.append(["useradd", "--uid", str(context.uid), "--gid", str(context.gid), "--no-user-group",
                         "--no-create-home", "--home-dir", JOB_HOME, "--shell", JOB_SHELL,
                         "--comment", "blahvm job", context.user])
    return commands


def user_data(context: JobContext, site: Optional[str] = None) -> str:
    """The ``#cloud-config`` of the seed: blahvm's part, then the site's additions (``site``: an
    ``Environment.user_data``), which may never set what blahvm owns."""
    extra = additions(site)
    owned = sorted(set(extra) & set(OWNED))
    if owned:  # the config refuses them; a hand-made Environment must not slip them in either
        raise ValueError(f"the site's user-data sets what blahvm owns: {', '.join(owned)}")
    agent = base64.b64encode(gzip.compress(agent_source(), mtime=0)).decode("ascii")
    document: Dict[str, Any] = {
        "hostname": context.hostname,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "users": [],
        "write_files": [
            {"path": AGENT_PATH, "encoding": "gz+b64", "content": agent, "owner": "root:root",
             "permissions": "0644"},
            {"path": AGENT_UNIT_PATH, "content": agent_unit(), "owner": "root:root", "permissions": "0644"},
            *extra.pop("write_files", []),
        ],
        "runcmd": [
            *_identity_commands(context),
            *extra.pop("runcmd", []),
            ["systemctl", "daemon-reload"],
            ["systemctl", "start", "--no-block", AGENT_UNIT],
        ],
    }
    document.update(extra)
    return "#cloud-config\n" + _dump(document)
