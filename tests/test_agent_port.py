"""The agent on a model of a virtio port whose host hangs up and the next one connects at once.

A guest learns of host connects and disconnects from control messages on another virtqueue than
the data, handled later. So the next host's bytes can be read while the port still shows the
previous host's departure (POLLHUP, reads of 0, writes that would block), or the departure can
show only after the next host's open was read. The model below has a Linux guest's semantics for
one port (drivers/char/virtio_console.c) and lets a test set the order; the agent's Port runs on it
in a thread, as on /dev/vportNpM.
"""

import os
import select
import threading
import time
import uuid

import pytest

from blahvm.guest import agent
from blahvm.guest.protocol import CONTROL, STDOUT, FrameDecoder, encode_control, open_frame

WAIT = 10.0


class VirtioPortModel(agent.Channel):
    """The guest end of a virtio port; the test plays the host and the order of events."""

    def __init__(self):
        super().__init__(-1, "model", reconnects=True)
        self.cond = threading.Condition()
        self.inbuf = bytearray()  # host to guest, not yet read
        self.connected = True  # the guest's view: updated by control messages, late
        self.decoder = FrameDecoder()
        self.frames = []  # what the host has received, but stdout
        self.stdout = bytearray()

    # -- the guest's side: what Channel calls instead of os.read / os.write / poll

    def _read(self, size):
        with self.cond:
            if self.inbuf:
                data = bytes(self.inbuf[:size])
                del self.inbuf[:size]
                self.cond.notify_all()
                return data
            if not self.connected:
                return b""
            raise BlockingIOError()

    def _write(self, data):
        with self.cond:
            if not self.connected:
                raise BlockingIOError()
            for kind, payload in self.decoder.feed(bytes(data)):
                if kind == STDOUT:
                    self.stdout += payload
                else:
                    self.frames.append((kind, payload))
            self.cond.notify_all()
            return len(data)

    def _mask(self):
        mask = 0
        if self.inbuf or not self.connected:
            mask |= select.POLLIN
        if self.connected:
            mask |= select.POLLOUT
        else:
            mask |= select.POLLHUP
        return mask

    def _poll(self, events, timeout=None):
        with self.cond:
            self.cond.wait_for(lambda: self._mask() & (events | select.POLLHUP), timeout)
            return self._mask() & (events | select.POLLHUP)

    # -- the host's side

    def host_send(self, data, connected=None):
        """Bytes from the host; ``connected`` changes the guest's view of the host in the same step."""
        with self.cond:
            self.inbuf += data
            if connected is not None:
                self.connected = connected
            self.cond.notify_all()

    def set_connected(self, connected):
        with self.cond:
            self.connected = connected
            self.cond.notify_all()

    def wait_read(self):
        """Until the agent has read everything the host sent."""
        with self.cond:
            assert self.cond.wait_for(lambda: not self.inbuf, WAIT), "the agent did not read"

    def next_control(self, type_, timeout=WAIT):
        """The next control message of ``type_`` the host got; what came before it is dropped."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for index, (kind, payload) in enumerate(self.frames):
                    if kind == CONTROL and payload["type"] == type_:
                        del self.frames[: index + 1]
                        return payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {type_} came; the host got {self.frames!r}")
                self.cond.wait(remaining)

    def output(self):
        with self.cond:
            return bytes(self.stdout)


@pytest.fixture
def port(monkeypatch):
    monkeypatch.setattr(agent, "HOST_GONE_SECONDS", 0.5)
    binding = agent.Binding()  # this test's own, bound as root on the host would bind a guest
    binding.bind(agent.Identity(os.getuid(), os.getgid(), [os.getgid()], False))
    monkeypatch.setattr(agent, "BINDING", binding)
    model = VirtioPortModel()
    serving = threading.Thread(target=agent.Port(model).serve, daemon=True)
    serving.start()
    yield model
    # The host leaves for good and the port with it: the agent kills what still runs and its thread
    # ends here, so it never writes to stderr during a later test (whose capture would get the line).
    model.reconnects = False
    model.set_connected(False)
    serving.join(WAIT)
    assert not serving.is_alive(), "the agent did not stop with its port"


def session(port, **connected):
    nonce = uuid.uuid4().hex
    port.host_send(open_frame(nonce), **connected)
    hello = port.next_control("hello")
    assert hello["nonce"] == nonce
    return hello["session"]


def run(port, token, argv):
    port.host_send(encode_control({"type": "exec", "session": token, "argv": argv}))
    port.next_control("started")
    return port.next_control("exit")


def test_an_open_read_while_the_port_still_shows_the_previous_host_gone(port):
    assert run(port, session(port), ["/bin/true"]) == {"type": "exit", "code": 0}
    # the previous host left and the next one sent its open; the guest has taken the data and the
    # departure, and will see the new host only a moment later
    nonce = uuid.uuid4().hex
    port.host_send(open_frame(nonce), connected=False)
    port.wait_read()
    time.sleep(0.1)
    port.set_connected(True)
    hello = port.next_control("hello")
    assert hello["nonce"] == nonce
    assert run(port, hello["session"], ["/bin/true"]) == {"type": "exit", "code": 0}


def test_the_previous_hosts_departure_seen_after_the_next_hosts_open(port):
    assert run(port, session(port), ["/bin/true"]) == {"type": "exit", "code": 0}
    token = session(port)  # read while the port still shows the previous host
    port.set_connected(False)  # then its departure shows, and at once the new host
    time.sleep(0.1)
    port.set_connected(True)
    assert run(port, token, ["/bin/true"]) == {"type": "exit", "code": 0}


def test_a_payload_outlives_a_departure_that_is_only_a_moment(port):
    token = session(port)
    port.host_send(encode_control({"type": "exec", "session": token, "argv": ["sh", "-c", "sleep 1; echo done"]}))
    port.next_control("started")
    port.set_connected(False)
    time.sleep(0.2)
    port.set_connected(True)
    assert port.next_control("exit") == {"type": "exit", "code": 0}
    assert port.output() == b"done\n"


def test_a_host_gone_for_good_kills_its_payload_and_the_next_host_is_served(port, tmp_path):
    token = session(port)
    pid_file = tmp_path / "pid"
    port.host_send(encode_control({"type": "exec", "session": token,
                                   "argv": ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 1000"]}))
    port.next_control("started")
    deadline = time.monotonic() + WAIT
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    port.set_connected(False)
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the payload outlived its host"
        time.sleep(0.05)
    port.set_connected(True)
    assert run(port, session(port), ["/bin/true"]) == {"type": "exit", "code": 0}


def test_a_frame_its_host_never_finished_does_not_swallow_the_next_open(port):
    token = session(port)
    port.host_send(encode_control({"type": "exec", "session": token, "argv": ["cat"], "stdin": True}))
    port.next_control("started")
    port.host_send(agent.HEADER.pack(agent.MAGIC, agent.STDIN, 1000) + b"x" * 10)  # then it is killed
    port.set_connected(False)
    port.wait_read()
    time.sleep(0.1)
    nonce = uuid.uuid4().hex
    port.host_send(open_frame(nonce))  # the next host's open, read before it shows on the port
    time.sleep(1.0)  # the departure lasts: it counts
    port.set_connected(True)
    assert port.next_control("hello")["nonce"] == nonce
