"""The real agent (agent.py run alone, as in a guest image) driven by the real client over UNIX sockets."""

import hashlib
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.guest import agent
from blahvm.guest.client import AgentError, AgentTimeout, acquire_port, run_payload, wait_ready
from blahvm.guest.protocol import (
    CONTROL,
    FrameDecoder,
    agent_socket_path,
    encode_control,
    exec_request,
    open_frame,
)

GUEST_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
CLIENT_SCRIPT = (
    "import sys\n"
    "from blahvm.guest.client import run_payload\n"
    "sys.exit(run_payload(sys.argv[1], sys.argv[2:], ready_timeout=60))\n"
)
SOCKETS = 2
NONCE = "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def run_dir():
    """A job's run directory with an agent serving agent.0.sock and agent.1.sock.

    The agent is a copy of agent.py alone, run by the system python3 in isolated mode: what a
    guest image runs, with nothing of blahvm importable.
    """
    directory = tempfile.mkdtemp(prefix="blahvm-agent-test-")
    os.chmod(directory, 0o755)
    script = os.path.join(directory, "agent.py")
    shutil.copy(agent.__file__, script)
    sockets = [agent_socket_path(directory, i) for i in range(SOCKETS)]
    command = [GUEST_PYTHON, "-I", script]
    for path in sockets:
        command += ["--listen", path]
    log = open(os.path.join(directory, "agent.log"), "wb")
    process = subprocess.Popen(command, stderr=log, cwd="/")
    try:
        for path in sockets:
            wait_ready(path, timeout=60)
        yield directory
    finally:
        process.kill()
        process.wait()
        log.close()
        shutil.rmtree(directory)


@pytest.fixture
def sock(run_dir):
    return agent_socket_path(run_dir, 0)


def run(sock, argv, stdin_data=None, ready_timeout=60, **options):
    """run_payload with output captured in files: (exit code, stdout bytes, stderr bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        stdin = None
        if stdin_data is not None:
            inp.write(stdin_data)
            inp.flush()
            inp.seek(0)
            stdin = inp.fileno()
        code = run_payload(
            sock, argv, stdin=stdin, stdout=out.fileno(), stderr=err.fileno(), ready_timeout=ready_timeout, **options
        )
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


def live_members(pgid):
    """Pids of processes in group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry))
    return members


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def read_line(stream, timeout=60.0):
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output from the client within %s s" % timeout
    return stream.readline()


# -- output, input, exit codes ---------------------------------------------------------------


def test_all_byte_values_arrive_exactly(sock, tmp_path):
    data = bytes(range(256)) * 3
    (tmp_path / "bytes").write_bytes(data)
    assert run(sock, ["cat", str(tmp_path / "bytes")]) == (0, data, b"")


def test_ten_mebibytes_arrive_exactly(sock, tmp_path):
    data = os.urandom(10 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    code, out, err = run(sock, ["cat", str(tmp_path / "big")])
    assert code == 0 and err == b""
    assert len(out) == len(data) and hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


def test_stdout_and_stderr_stay_apart(sock):
    payload = "import os\nfor _ in range(300):\n    os.write(1, b'o' * 999)\n    os.write(2, b'e' * 777)\n"
    code, out, err = run(sock, [GUEST_PYTHON, "-c", payload])
    assert (code, out, err) == (0, b"o" * 999 * 300, b"e" * 777 * 300)


def test_stdin_is_forwarded_beyond_the_window_and_ends(sock):
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than the agent's stdin window
    code, out, err = run(sock, ["cat"], stdin_data=data)
    assert code == 0 and out == data


def test_stdin_eof_reaches_the_payload(sock):
    assert run(sock, ["wc", "-c"], stdin_data=b"12345") == (0, b"5\n", b"")


def test_without_stdin_the_payload_reads_nothing(sock):
    assert run(sock, ["wc", "-c"]) == (0, b"0\n", b"")


def test_payload_that_ignores_stdin_still_finishes(sock):
    code, out, _ = run(sock, ["sh", "-c", "echo done"], stdin_data=os.urandom(4 * 1024 * 1024))
    assert (code, out) == (0, b"done\n")


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_code_is_exact(sock, code):
    assert run(sock, ["sh", "-c", "exit %d" % code])[0] == code


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_death_by_signal_is_128_plus_n(sock, signum):
    assert run(sock, ["sh", "-c", "kill -%d $$" % signum])[0] == 128 + signum


def test_missing_command_is_127_with_a_reason(sock):
    code, out, err = run(sock, ["/no/such/program", "x"])
    assert code == 127 and out == b""
    assert b"cannot run '/no/such/program'" in err


def test_non_executable_is_126(sock, tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("not a program")
    assert run(sock, [str(target)])[0] == 126


def test_environment_and_cwd_are_exactly_as_given(sock, tmp_path):
    env = {"A": "1", "SPACED": "x y", "UTF": "d\u00e9j\u00e0"}
    code, out, _ = run(sock, ["/usr/bin/env"], env=env, cwd=str(tmp_path))
    assert code == 0
    assert sorted(out.decode().splitlines()) == sorted("%s=%s" % item for item in env.items())
    code, out, _ = run(sock, ["/bin/pwd"], cwd=str(tmp_path))
    assert out.decode().strip() == str(tmp_path)


def test_arguments_are_not_interpreted_and_may_be_any_bytes(sock):
    argv = [b"/usr/bin/printf", b"%s|%s", b"$HOME `id` *", b"\xff\xfe\x01"]
    assert run(sock, argv) == (0, b"$HOME `id` *|\xff\xfe\x01", b"")


def test_leftover_processes_die_with_the_job(sock):
    code, out, _ = run(sock, ["sh", "-c", "sleep 1000 & echo $!"])
    assert code == 0
    leftover = int(out)
    assert wait_until(lambda: not alive(leftover))


# -- signals and kills ---------------------------------------------------------------------------


def _start_client(sock, script):
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, sock, "sh", "-c", script], stdout=subprocess.PIPE
    )


@pytest.mark.parametrize("name", ["TERM", "INT", "HUP", "USR1", "USR2"])
def test_signals_sent_to_the_client_reach_the_payload(sock, name):
    script = 'trap "echo got %s; exit 3" %s; echo ready; while :; do sleep 0.1; done' % (name, name)
    client = _start_client(sock, script)
    try:
        assert read_line(client.stdout) == b"ready\n"
        client.send_signal(getattr(signal, "SIG" + name))
        out, _ = client.communicate(timeout=60)
    finally:
        client.kill()
    assert out == b"got %s\n" % name.encode()
    assert client.returncode == 3


def test_killing_the_client_kills_the_payloads_process_group(sock):
    client = _start_client(sock, "sleep 1000 & echo $$; wait")
    try:
        pgid = int(read_line(client.stdout))
        assert len(live_members(pgid)) == 2  # sh and its sleep
    finally:
        client.kill()
        client.wait()
    assert wait_until(lambda: not live_members(pgid)), live_members(pgid)


def test_the_agent_serves_again_after_a_killed_client(sock):
    test_killing_the_client_kills_the_payloads_process_group(sock)
    assert run(sock, ["echo", "again"]) == (0, b"again\n", b"")


# -- agents that do not answer, or answer wrongly ------------------------------------------------


def test_an_agent_that_never_says_hello_times_out_within_the_bound(tmp_path):
    path = str(tmp_path / "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(1)  # like QEMU's socket before the guest's agent runs: accepts, says nothing
    try:
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match="did not answer within 1 s"):
            run_payload(path, ["true"], ready_timeout=1.0)
        with pytest.raises(AgentTimeout):
            wait_ready(path, timeout=1.0)
        assert time.monotonic() - started < 2 * 1.0 + 10  # bounded, with room for a loaded machine
    finally:
        silent.close()


def test_no_agent_socket_is_a_clear_error(tmp_path):
    with pytest.raises(AgentError, match="cannot connect to agent socket"):
        run_payload(str(tmp_path / "none.sock"), ["true"], ready_timeout=5)


def test_a_peer_speaking_garbage_is_an_agent_error(tmp_path):
    path = str(tmp_path / "garbage.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer():
        connection, _ = server.accept()
        connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        connection.recv(1)
        connection.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(AgentError, match="malformed frame"):
            run_payload(path, ["true"], ready_timeout=30)
    finally:
        server.close()
        thread.join(10)


def _converse_raw(sock, data):
    """Connect, send ``data``, hang up our side; all the agent sent back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(60)
        raw.connect(sock)
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                return received
            received += chunk


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_malformed_frames_do_not_crash_the_agent(sock, garbage):
    frames = FrameDecoder().feed(_converse_raw(sock, open_frame(NONCE) + garbage))
    assert frames[0][0] == CONTROL and frames[0][1]["type"] == "hello"
    assert frames[0][1]["nonce"] == NONCE
    assert all(kind == CONTROL and message["type"] == "error" for kind, message in frames[1:])
    assert wait_ready(sock, timeout=60).protocol == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=300))
def test_bytes_before_an_open_are_skipped(sock, garbage):
    frames = FrameDecoder().feed(_converse_raw(sock, garbage + open_frame(NONCE)))
    assert [(kind, message["type"], message["nonce"]) for kind, message in frames] == [(CONTROL, "hello", NONCE)]


def test_a_request_of_an_earlier_session_is_ignored(sock, tmp_path):
    marker = tmp_path / "stale-exec-ran"
    stale = encode_control(exec_request("not-this-session", ["touch", str(marker)]))
    frames = FrameDecoder().feed(_converse_raw(sock, open_frame(NONCE) + stale))
    assert [message["type"] for _, message in frames] == ["hello"]
    assert not marker.exists()


def test_an_open_ends_what_the_previous_host_left_running(sock):
    """A virtio port may not show a host leaving if the next connects at once: the open says it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(60)
        raw.connect(sock)
        raw.sendall(open_frame(NONCE))
        decoder, frames = FrameDecoder(), []

        def next_control():
            while not frames:
                frames.extend(f for f in decoder.feed(raw.recv(65536)) if f[0] == CONTROL)
            return frames.pop(0)[1]

        hello = next_control()
        raw.sendall(encode_control(exec_request(hello["session"], ["sleep", "1000"])))
        started = next_control()
        assert started["type"] == "started" and live_members(started["pid"])
        second = "1" * 32
        raw.sendall(open_frame(second))
        assert next_control()["nonce"] == second  # no exit of the first payload comes to the new host
        assert wait_until(lambda: not live_members(started["pid"]))


# -- several tasks at once, and who runs them ----------------------------------------------------


def test_concurrent_execs_on_separate_ports(run_dir, tmp_path):
    """Each payload waits for the other's file: both finish only if they run at the same time."""
    results = {}

    def task(index, mine, theirs):
        script = (
            "touch %s; i=0; while [ ! -e %s ]; do sleep 0.05; i=$((i+1)); [ $i -gt 1200 ] && exit 9; done; echo %d"
            % (mine, theirs, index)
        )
        results[index] = run(agent_socket_path(run_dir, index), ["sh", "-c", script])

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    threads = [threading.Thread(target=task, args=(0, a, b)), threading.Thread(target=task, args=(1, b, a))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == {0: (0, b"0\n", b""), 1: (0, b"1\n", b"")}


def test_acquire_port_hands_out_each_port_once(run_dir):
    with acquire_port(run_dir) as first, acquire_port(run_dir) as second:
        assert {first, second} == {agent_socket_path(run_dir, i) for i in range(SOCKETS)}
        with pytest.raises(AgentTimeout, match="busy"):
            with acquire_port(run_dir, timeout=0.2):
                pass
        assert run(second, ["echo", "x"]) == (0, b"x\n", b"")
    with acquire_port(run_dir) as again:
        assert again == agent_socket_path(run_dir, 0)


def test_acquire_port_without_sockets_is_an_error(tmp_path):
    with pytest.raises(AgentError, match="no agent sockets"):
        with acquire_port(str(tmp_path)):
            pass


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
def test_runs_as_the_given_user_and_group(sock):
    code, out, _ = run(sock, ["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534)
    assert (code, out) == (0, b"65534\n65534\n65534\n")


@needs_root
def test_cwd_is_entered_with_the_users_rights(sock, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code, _, err = run(sock, ["pwd"], uid=65534, gid=65534, cwd=str(private))
    assert code == 126 and b"Permission denied" in err


def test_the_socket_is_private(sock):
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
