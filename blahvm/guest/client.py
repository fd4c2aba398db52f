"""The host side of the guest agent: run a payload in the guest and relay it as if it ran here.

``run_payload`` needs no libvirt and no privilege beyond the job's own agent socket, so it may
run as the job's user (LSF JOB_STARTER, a Slurm wrapper). Its return value is the payload's exit
code exactly (death by signal N gives 128+N), its stdout and stderr arrive byte for byte, and the
signals a batch system sends to stop a job reach the payload's process group in the guest. If
the calling process dies, even by SIGKILL, its socket closes and the agent kills the payload.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import select
import signal
import socket
import threading
import time
import uuid
from typing import Iterator, Mapping, Optional, Sequence, Tuple

from blahvm.guest.agent import write_all, Disconnected
from blahvm.guest.protocol import (
    CONTROL,
    DATA_CHUNK,
    STDERR,
    STDIN,
    STDOUT,
    FrameDecoder,
    Hello,
    ProtocolError,
    Text,
    encode_control,
    encode_data,
    exec_request,
    open_frame,
)

FORWARDED_SIGNALS: Tuple[int, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class AgentError(Exception):
    """The agent cannot be reached or broke the conversation; the message says which and where."""


class AgentTimeout(AgentError):
    """The agent did not answer within the bound."""


# -- one connection ------------------------------------------------------------------------------


# A silent agent gets the open again (with a new nonce), after OPEN_RESEND_FIRST seconds, then
# twice as long each time up to OPEN_RESEND_MAX. No loss of an open is known any more: the one seen
# (an open read while the port still showed the previous host's departure) is handled in the agent,
# see HOST_GONE_SECONDS there. The resend stays as a cheap defence in depth: a lost open would
# otherwise cost a launch its whole ready timeout, and an agent may not see a host that left in the
# middle of a short frame (docs/agent.md, "Not covered"). Tests set it off so that a loss shows.
OPEN_RESEND_FIRST = 1.0
OPEN_RESEND_MAX = 8.0


class _Connection:
    """A socket to an agent, read as frames, written one whole frame at a time."""

    def __init__(self, sock: socket.socket, where: str):
        self.sock = sock
        self.where = where
        self.decoder = FrameDecoder()
        self.pending: list = []
        self._send_lock = threading.Lock()

    @classmethod
    def open(cls, socket_path: str, timeout: float) -> "_Connection":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(timeout, 0.001))
        try:
            sock.connect(socket_path)
        except socket.timeout:
            sock.close()
            raise AgentTimeout(f"agent socket {socket_path}: connect timed out after {timeout:g} s") from None
        except OSError as error:
            sock.close()
            raise AgentError(f"cannot connect to agent socket {socket_path}: {error.strerror or error}") from None
        sock.setblocking(True)
        return cls(sock, socket_path)

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError as error:
                raise AgentError(f"agent at {self.where} went away: {error.strerror or error}") from None

    def fill(self, timeout: Optional[float]) -> bool:
        """Read what is there into ``pending``; False if nothing came within ``timeout``."""
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
            if not ready:
                return False
        try:
            data = self.sock.recv(256 * 1024)
        except OSError as error:
            raise AgentError(f"agent at {self.where}: {error.strerror or error}") from None
        if not data:
            raise AgentError(f"agent at {self.where} closed the connection unexpectedly")
        try:
            self.pending.extend(self.decoder.feed(data))
        except ProtocolError as error:
            raise AgentError(f"agent at {self.where} sent a malformed frame: {error}") from None
        return True

    def next_control(
        self, deadline: float, waiting_for: str, outputs: Optional[dict] = None, errors: bool = True
    ) -> dict:
        """The next control message, or AgentTimeout once ``deadline`` passes.

        Data frames on the way go to ``outputs`` ({STDOUT: fd, STDERR: fd}), or are dropped;
        an error message raises AgentError unless ``errors`` is false.
        """
        while True:
            while self.pending:
                kind, payload = self.pending.pop(0)
                if outputs and kind in outputs and payload:
                    write_all(outputs[kind], payload)
                elif kind == CONTROL:
                    if payload["type"] == "error" and errors:
                        raise AgentError(f"agent at {self.where}: {payload.get('message')}")
                    return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.fill(remaining):
                raise AgentTimeout(f"agent at {self.where} did not send {waiting_for} in time")


def _hello(connection: _Connection, deadline: float, timeout: float) -> Hello:
    """Open a session and wait for the agent's answer to it.

    What comes before our hello (an answer to an earlier host's open, an error about an earlier
    host's bytes) is left over from before us on a virtio port, and is skipped.
    """
    # The open is sent again while no answer comes (see OPEN_RESEND_FIRST). Only the answer to the
    # latest open counts: each new open ends the session before it.
    nonce, resend_at, interval = None, 0.0, OPEN_RESEND_FIRST
    while True:
        now = time.monotonic()
        if now >= resend_at:
            nonce = uuid.uuid4().hex
            connection.send(open_frame(nonce))
            resend_at, interval = now + interval, min(interval * 2, OPEN_RESEND_MAX)
        try:
            message = connection.next_control(min(deadline, resend_at), "hello", errors=False)
        except AgentTimeout:
            if time.monotonic() < deadline:
                continue
            raise AgentTimeout(
                f"the agent at {connection.where} did not answer within {timeout:g} s "
                "(guest not up yet, agent not running, or the port is in use by another launch)"
            ) from None
        if message["type"] == "hello" and message.get("nonce") == nonce:
            try:
                return Hello.from_message(message)
            except ProtocolError as error:
                raise AgentError(f"agent at {connection.where}: {error}") from None


def open_session(socket_path: str, timeout: float) -> Tuple[_Connection, Hello]:
    """A connection to the agent behind ``socket_path`` with a session open, retrying while the
    socket is not there yet or refuses; AgentTimeout after ``timeout`` seconds. The caller closes it."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentTimeout(f"the agent at {socket_path} did not answer within {timeout:g} s ({last_error})")
        try:
            connection = _Connection.open(socket_path, remaining)
        except AgentTimeout:
            continue
        except AgentError as error:
            last_error = str(error)
            time.sleep(min(0.05, max(remaining, 0)))
            continue
        try:
            return connection, _hello(connection, deadline, timeout)
        except AgentError as error:  # e.g. reset while the guest's agent (re)starts: ask again until the deadline
            last_error = str(error)
            connection.close()


def wait_ready(socket_path: str, timeout: float) -> Hello:
    """Wait until the agent behind ``socket_path`` says hello, then hang up."""
    connection, hello = open_session(socket_path, timeout)
    connection.close()
    return hello


# -- running a payload ---------------------------------------------------------------------------


def run_payload(
    socket_path: str,
    argv: Sequence[Text],
    env: Optional[Mapping[Text, Text]] = None,
    cwd: Optional[Text] = None,
    uid: Optional[int] = None,
    gid: Optional[int] = None,
    stdin: Optional[int] = None,
    stdout: int = 1,
    stderr: int = 2,
    ready_timeout: float = 30.0,
    forward_signals: Sequence[int] = FORWARDED_SIGNALS,
) -> int:
    """Run ``argv`` through the agent at ``socket_path``; return its exit code (signal N: 128+N).

    ``stdin`` is a readable fd whose bytes (until EOF) go to the payload, or None for /dev/null;
    ``stdout``/``stderr`` are fds that receive the payload's output as it comes. The agent's hello
    and the payload's start are each awaited at most ``ready_timeout`` seconds (AgentTimeout).
    ``forward_signals`` are relayed to the payload while it runs; that needs the main thread,
    elsewhere nothing is forwarded. Raises AgentError if the agent is unreachable or misbehaves.
    """
    try:
        request = exec_request("", argv, env=env, cwd=cwd, uid=uid, gid=gid, stdin=stdin is not None)
    except (TypeError, ValueError) as error:
        raise AgentError(f"cannot run {list(argv)!r}: {error}") from None
    with _forwarding(forward_signals) as signals_fd:
        connection = _Connection.open(socket_path, ready_timeout)
        try:
            deadline = time.monotonic() + ready_timeout
            hello = _hello(connection, deadline, ready_timeout)
            request["session"] = hello.session
            connection.send(encode_control(request))
            started = connection.next_control(
                time.monotonic() + ready_timeout, "the payload's start", {STDOUT: stdout, STDERR: stderr}
            )
            if started["type"] == "exit":  # it could not start: the reason went to stderr
                return _exit_code(started, connection.where)
            if started["type"] != "started":
                raise AgentError(f"agent at {connection.where} answered exec with {started['type']!r}")
            return _Relay(connection, stdin, stdout, stderr, started.get("window", 0)).run(signals_fd)
        finally:
            connection.close()


def _exit_code(message: Mapping, where: str) -> int:
    signum, code = message.get("signal"), message.get("code")
    if isinstance(signum, int) and 0 < signum < 128:
        return 128 + signum
    if isinstance(code, int) and 0 <= code <= 255:
        return code
    raise AgentError(f"agent at {where} sent an exit message without a valid code or signal: {dict(message)!r}")


class _Relay:
    """Agent output to our fds, our stdin to the agent (within its window), our signals to it."""

    def __init__(self, connection: _Connection, stdin: Optional[int], stdout: int, stderr: int, window: int):
        self.connection = connection
        self.outputs = {STDOUT: stdout, STDERR: stderr}
        self.stdin = stdin
        self.credit = int(window)
        self.credit_changed = threading.Condition()
        self.stop_r, self.stop_w = os.pipe()

    def run(self, signals_fd: Optional[int]) -> int:
        pump = None
        if self.stdin is not None:
            pump = threading.Thread(target=self._pump_stdin, name="blahvm-stdin", daemon=True)
            pump.start()
        try:
            return self._relay(signals_fd)
        finally:
            os.close(self.stop_w)  # wakes the pump
            with self.credit_changed:
                self.credit_changed.notify_all()
            if pump is not None:
                pump.join()
            os.close(self.stop_r)

    def _relay(self, signals_fd: Optional[int]) -> int:
        connection = self.connection
        watched = [connection.sock] + ([signals_fd] if signals_fd is not None else [])
        if signals_fd is not None:
            self._forward_signals(signals_fd)  # any that came while connecting
        while True:
            while connection.pending:
                kind, payload = connection.pending.pop(0)
                if kind in self.outputs:
                    if payload:
                        self._write_output(self.outputs[kind], payload)
                elif kind == CONTROL:
                    kind_of = payload["type"]
                    if kind_of == "exit":
                        return _exit_code(payload, connection.where)
                    if kind_of == "window":
                        self._grant(payload.get("bytes"))
                    elif kind_of == "error":
                        raise AgentError(f"agent at {connection.where}: {payload.get('message')}")
            ready, _, _ = select.select(watched, [], [])
            if signals_fd is not None and signals_fd in ready:
                self._forward_signals(signals_fd)
            if connection.sock in ready:
                connection.fill(None)

    def _write_output(self, fd: int, data: bytes) -> None:
        try:
            write_all(fd, data)
        except Disconnected:
            pass  # our reader went away (closed pipe): the payload still runs to its end

    def _forward_signals(self, signals_fd: int) -> None:
        try:
            received = os.read(signals_fd, 512)
        except BlockingIOError:
            return
        for signum in received:
            self.connection.send(encode_control({"type": "signal", "signal": signum}))

    def _grant(self, amount: object) -> None:
        if isinstance(amount, int) and amount > 0:
            with self.credit_changed:
                self.credit += amount
                self.credit_changed.notify_all()

    def _pump_stdin(self) -> None:
        """Our stdin to the payload, never more than the agent's window ahead; then EOF."""
        try:
            while True:
                with self.credit_changed:
                    while self.credit <= 0 and not self._stopped():
                        self.credit_changed.wait(0.5)
                    size = min(self.credit, DATA_CHUNK)
                ready, _, _ = select.select([self.stdin, self.stop_r], [], [])
                if self.stop_r in ready or self._stopped():
                    return
                chunk = os.read(self.stdin, size)
                with self.credit_changed:
                    self.credit -= len(chunk)
                self.connection.send(encode_data(STDIN, chunk))
                if not chunk:
                    return
        except (AgentError, OSError):
            return  # the relay reports what went wrong with the agent

    def _stopped(self) -> bool:
        ready, _, _ = select.select([self.stop_r], [], [], 0)
        return bool(ready)


@contextlib.contextmanager
def _forwarding(signals: Sequence[int]) -> Iterator[Optional[int]]:
    """While inside, ``signals`` are caught and their numbers readable from the yielded fd.

    Only the main thread may set handlers; elsewhere this yields None and forwards nothing.
    """
    if not signals or threading.current_thread() is not threading.main_thread():
        yield None
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = {}
    old_wakeup = signal.set_wakeup_fd(write_fd)
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, _note_signal)
        yield read_fd
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(read_fd)
        os.close(write_fd)


def _note_signal(signum: int, frame: object) -> None:
    """The wakeup fd carries the signal number; the relay loop forwards it."""


# -- choosing a port among a job's channels ------------------------------------------------------


@contextlib.contextmanager
def acquire_port(run_dir: str, timeout: float = 10.0) -> Iterator[str]:
    """Hold a free agent socket of the job whose run directory is ``run_dir``; yields its path.

    A port is held by an flock on ``<socket>.lock`` beside it (created 0600 as the caller), so
    concurrent tasks of a parallel job each get their own port; a process that dies releases it.
    Waits up to ``timeout`` seconds for one to come free (AgentTimeout), AgentError if none exist.
    """
    deadline = time.monotonic() + timeout
    while True:
        sockets = _agent_sockets(run_dir)
        if not sockets:
            raise AgentError(f"no agent sockets (agent.N.sock) in {run_dir}: the guest is not prepared on this host")
        for path in sockets:
            fd = _try_lock(path + ".lock")
            if fd is None:
                continue
            try:
                yield path
            finally:
                os.close(fd)
            return
        if time.monotonic() >= deadline:
            raise AgentTimeout(f"all {len(sockets)} agent ports in {run_dir} stayed busy for {timeout:g} s")
        time.sleep(0.05)


def _agent_sockets(run_dir: str) -> list:
    def index(path: str) -> int:
        middle = os.path.basename(path)[len("agent.") : -len(".sock")]
        return int(middle) if middle.isdigit() else -1

    try:  # glob would hide why nothing is found
        names = os.listdir(run_dir)
    except OSError as error:
        raise AgentError(f"cannot read the job's run directory {run_dir}: {error.strerror}") from None
    paths = [os.path.join(run_dir, name) for name in names if fnmatch.fnmatchcase(name, "agent.*.sock")]
    return sorted((p for p in paths if index(p) >= 0), key=index)


def _try_lock(lock_path: str) -> Optional[int]:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise AgentError(f"cannot open the port lock {lock_path}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise AgentError(f"cannot lock {lock_path}: {error.strerror}") from None
    return fd
