"""The wire protocol between the host and the guest agent, for the host side.

The framing itself lives in ``blahvm.guest.agent`` (that file is copied alone into guest images,
so it must carry it); this module re-exports it and adds the host's view of the messages.
See docs/agent.md for the frames and the conversation.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import attrs

from blahvm.guest.agent import (
    CONTROL,
    DATA_CHUNK,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    STDERR,
    STDIN,
    STDOUT,
    FrameDecoder,
    ProtocolError,
    decode_control,
    encode_control,
    encode_data,
    open_frame,
)

__all__ = [
    "CONTROL",
    "DATA_CHUNK",
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "STDERR",
    "STDIN",
    "STDOUT",
    "FrameDecoder",
    "Hello",
    "ProtocolError",
    "agent_socket_path",
    "decode_control",
    "encode_control",
    "encode_data",
    "exec_request",
    "open_frame",
    "port_name",
]

PORT_PREFIX = "org.blahvm.agent."


def port_name(index: int) -> str:
    """The guest-side name of agent channel ``index``: ``org.blahvm.agent.<index>``."""
    return f"{PORT_PREFIX}{int(index)}"


def agent_socket_path(run_dir: str, index: int) -> str:
    """Where the host end of channel ``index`` lives in a job's run directory.

    Kept short: a UNIX socket path holds at most 107 bytes.
    """
    return os.path.join(run_dir, f"agent.{int(index)}.sock")


@attrs.frozen
class Hello:
    """What an agent says first on every connection."""

    protocol: int
    version: str
    hostname: str
    session: str
    port: str = ""
    nonce: str = ""  # echoes the host's open

    @classmethod
    def from_message(cls, message: Mapping) -> "Hello":
        try:
            hello = cls(
                protocol=message["protocol"],
                version=message["version"],
                hostname=message["hostname"],
                session=message["session"],
                port=message.get("port", ""),
                nonce=message.get("nonce", ""),
            )
        except KeyError as missing:
            raise ProtocolError(f"hello message lacks {missing}") from None
        if not isinstance(hello.protocol, int) or not isinstance(hello.session, str):
            raise ProtocolError("hello message has a malformed protocol or session")
        return hello


Text = Union[str, bytes]


def _wire_text(value: Text, what: str) -> str:
    """Bytes travel as str with surrogate escapes, which JSON carries as \\udcXX."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return value
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def exec_request(
    session: str,
    argv: Sequence[Text],
    env: Optional[Mapping[Text, Text]] = None,
    cwd: Optional[Text] = None,
    uid: Optional[int] = None,
    gid: Optional[int] = None,
    stdin: bool = False,
) -> dict:
    """The exec message; raises ValueError/TypeError on argv, env, cwd or ids that cannot be run."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings")
    message: dict = {
        "type": "exec",
        "session": session,
        "argv": [_wire_text(arg, "argv item") for arg in argv],
        "stdin": bool(stdin),
    }
    if env is not None:
        message["env"] = {_wire_text(k, "env name"): _wire_text(v, "env value") for k, v in env.items()}
    if cwd is not None:
        message["cwd"] = _wire_text(cwd, "cwd")
    for name, value in (("uid", uid), ("gid", gid)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
            message[name] = value
    return message
