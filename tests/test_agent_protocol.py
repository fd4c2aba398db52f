"""The wire framing and the agent's request validation: pure, no processes."""

import ast
import json
import pathlib
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.guest import agent, protocol
from blahvm.guest.protocol import (
    CONTROL,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    STDERR,
    STDIN,
    STDOUT,
    FrameDecoder,
    Hello,
    ProtocolError,
    encode_control,
    encode_data,
    exec_request,
)

AGENT_SOURCE = pathlib.Path(agent.__file__).read_text()

json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
control_messages = st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(
    lambda d: dict(d, type="x")
) | st.fixed_dictionaries({"type": st.text(max_size=10), "argv": st.lists(st.text(), max_size=3)})
frames = st.one_of(
    control_messages.map(lambda m: (CONTROL, m)),
    st.tuples(st.sampled_from([STDIN, STDOUT, STDERR]), st.binary(max_size=3000)),
)


def _split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10**6), max_size=10))
def test_frames_survive_any_chunking(sent, cuts):
    wire = b"".join(
        encode_control(payload) if kind == CONTROL else encode_data(kind, payload) for kind, payload in sent
    )
    decoder = FrameDecoder()
    received = []
    for piece in _split(wire, cuts):
        received.extend(decoder.feed(piece))
    assert received == [(kind, payload) for kind, payload in sent]
    assert decoder.pending == 0


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_arbitrary_bytes_give_frames_or_protocol_error(garbage, cuts):
    decoder = FrameDecoder()
    try:
        for piece in _split(garbage, cuts):
            for kind, payload in decoder.feed(piece):
                assert kind in (CONTROL, STDIN, STDOUT, STDERR)
                if kind == CONTROL:
                    assert isinstance(payload["type"], str)
    except ProtocolError as error:
        assert str(error)
        with pytest.raises(ProtocolError):
            decoder.feed(b"")  # a failed stream stays failed


@given(st.integers(0, 255), st.binary(max_size=200))
def test_malformed_control_payloads_are_protocol_errors(seed, payload):
    bad = [payload, b"[1,2]", b'{"type": 3}', b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b"1" * 5000]
    body = bad[seed % len(bad)]
    decoder = FrameDecoder()
    try:
        decoder.feed(HEADER.pack(MAGIC, CONTROL, len(body)) + body)
    except ProtocolError:
        return
    message = json.loads(body)  # only real objects with a string type get through
    assert isinstance(message, dict) and isinstance(message["type"], str)


def test_oversized_frame_is_refused_before_its_payload_arrives():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(HEADER.pack(MAGIC, STDOUT, MAX_PAYLOAD + 1))


def test_bad_magic_and_kind_are_named():
    with pytest.raises(ProtocolError, match="magic"):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="kind 9"):
        FrameDecoder().feed(HEADER.pack(MAGIC, 9, 0))


def test_big_data_is_split_into_bounded_frames():
    data = bytes(range(256)) * 1000
    wire = encode_data(STDOUT, data)
    frames = FrameDecoder().feed(wire)
    assert all(len(payload) <= protocol.DATA_CHUNK for _, payload in frames)
    assert b"".join(payload for _, payload in frames) == data


def test_empty_data_frame_is_end_of_stream():
    assert FrameDecoder().feed(encode_data(STDIN, b"")) == [(STDIN, b"")]


def test_exec_request_carries_bytes_through_json():
    message = exec_request("s", [b"printf", b"\xffz"], env={b"K\xe9": "v"}, cwd=b"/tmp")
    decoded = FrameDecoder().feed(encode_control(message))[0][1]
    request = agent.ExecRequest(decoded)
    assert request.argv == [b"printf", b"\xffz"]
    assert request.env == {b"K\xe9": b"v"}
    assert request.cwd == b"/tmp"


@pytest.mark.parametrize(
    "bad",
    [
        {"argv": []},
        {"argv": "ls"},
        {"argv": ["ls", 3]},
        {"argv": ["a\0b"]},
        {"argv": ["ls"], "env": {"A=B": "c"}},
        {"argv": ["ls"], "env": {"": "c"}},
        {"argv": ["ls"], "env": ["PATH"]},
        {"argv": ["ls"], "uid": -1, "gid": 0},
        {"argv": ["ls"], "uid": True, "gid": 0},
        {"argv": ["ls"], "uid": 0, "gid": "0"},
        {"argv": ["ls"], "gid": 0, "groups": [None]},
        {"argv": ["ls"], "cwd": 5},
    ],
)
def test_bad_exec_requests_are_refused_with_a_reason(bad):
    with pytest.raises(agent.RequestError) as caught:
        agent.ExecRequest(dict(bad, type="exec"))
    assert str(caught.value)


@given(st.dictionaries(st.sampled_from(["argv", "env", "cwd", "uid", "gid", "groups", "stdin"]), json_values))
def test_any_exec_message_is_accepted_or_refused_cleanly(message):
    try:
        request = agent.ExecRequest(dict(message, type="exec"))
    except agent.RequestError:
        return
    assert request.argv and all(isinstance(arg, bytes) for arg in request.argv)


def test_host_side_refuses_bad_arguments():
    with pytest.raises(ValueError):
        exec_request("s", "ls")
    with pytest.raises(ValueError):
        exec_request("s", ["ls"], uid=-3)
    with pytest.raises(TypeError):
        exec_request("s", ["ls", 3])


def test_hello_needs_its_fields():
    with pytest.raises(ProtocolError, match="session"):
        Hello.from_message({"type": "hello", "protocol": 1, "version": "1", "hostname": "h"})


def test_socket_and_port_names():
    assert protocol.port_name(2) == "org.blahvm.agent.2"
    assert protocol.agent_socket_path("/run/blahvm/j1", 0) == "/run/blahvm/j1/agent.0.sock"


# -- agent.py must run alone on an old guest Python ------------------------------------------


def test_agent_parses_as_python_3_6():
    ast.parse(AGENT_SOURCE, feature_version=(3, 6))


def test_agent_imports_only_the_standard_library():
    tree = ast.parse(AGENT_SOURCE)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "agent.py must not import relatively"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


@pytest.mark.parametrize(
    "newer",
    [
        "capture_output",
        "text=True",
        "dataclasses",
        "from __future__ import annotations",
        "subprocess.run(",
        "removeprefix",
        "removesuffix",
        "asyncio.run(",
        "nullcontext",
        "time_ns",
        "waitstatus_to_exitcode",
        "strsignal",
        "shlex.join",
        "SimpleQueue",
        "math.isqrt",
        "functools.cache",
        "pidfd",
        "user=",
        "group=",
        "extra_groups",
        "process_group=",
        "-> list[",
        "-> dict[",
        "-> tuple[",
    ],
)
def test_agent_avoids_apis_newer_than_python_3_6(newer):
    assert newer not in AGENT_SOURCE


def test_open_frames_have_one_shape():
    first, second = protocol.open_frame("a" * 32), protocol.open_frame("b" * 32)
    assert len(first) == len(second) == agent.OPEN_SIZE
    assert first.startswith(agent.OPEN_PREFIX) and second.startswith(agent.OPEN_PREFIX)
    assert FrameDecoder().feed(first) == [(CONTROL, {"type": "open", "protocol": 1, "nonce": "a" * 32})]
    for bad in ("a" * 31, "A" * 32, "g" * 32):
        with pytest.raises(ValueError):
            protocol.open_frame(bad)
