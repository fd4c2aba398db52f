"""The real agent (agent.py run alone, as in a guest image) driven by the real client over UNIX sockets."""

import contextlib
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

from blahvm.guest import agent, control
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
ROOT = control.Identity(0, 0, (0,))  # the plumbing tests' job is root's: they read and signal anything
NOBODY = control.Identity(65534, 65534, (65534,))
NONCE = "0123456789abcdef" * 2


def start_agent(directory, identity, sockets=SOCKETS, preexec_fn=None):
    """A copy of agent.py alone, run by the system python3 in isolated mode (what a guest image
    runs, with nothing of blahvm importable), serving agent.N.sock in ``directory`` and bound to
    ``identity`` over its control socket; the process."""
    script = os.path.join(directory, "agent.py")
    shutil.copy(agent.__file__, script)
    paths = [agent_socket_path(directory, i) for i in range(sockets)]
    command = [GUEST_PYTHON, "-I", script, "--control-listen", os.path.join(directory, "control.sock")]
    for path in paths:
        command += ["--listen", path]
    with open(os.path.join(directory, "agent.log"), "ab") as log:
        process = subprocess.Popen(command, stderr=log, cwd="/", preexec_fn=preexec_fn)
    try:
        if identity is not None:
            control.bind(os.path.join(directory, "control.sock"), identity, timeout=60)
        for path in paths:
            wait_ready(path, timeout=60)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@contextlib.contextmanager
def agent_in_tmpdir(identity, sockets=SOCKETS, preexec_fn=None):
    """``start_agent`` in a directory of its own (0755), killed and removed afterwards; the directory."""
    directory = tempfile.mkdtemp(prefix="blahvm-agent-test-")
    os.chmod(directory, 0o755)
    try:
        process = start_agent(directory, identity, sockets, preexec_fn)
        try:
            yield directory
        finally:
            process.kill()
            process.wait()
    finally:
        shutil.rmtree(directory)


@pytest.fixture(scope="module")
def run_dir():
    """A job's run directory with an agent serving agent.0.sock and agent.1.sock, bound to root."""
    with agent_in_tmpdir(ROOT) as directory:
        yield directory


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


@pytest.fixture(scope="module")
def nobody_run_dir():
    """An agent bound to run the job of nobody (65534), as prepare binds a job's guest."""
    with agent_in_tmpdir(NOBODY, sockets=1) as directory:
        yield directory


@pytest.fixture
def nobody_sock(nobody_run_dir):
    return agent_socket_path(nobody_run_dir, 0)


@needs_root
def test_runs_as_the_bound_user_and_group_when_the_request_names_none(nobody_sock):
    code, out, _ = run(nobody_sock, ["sh", "-c", "id -u; id -g; id -G"])
    assert (code, out) == (0, b"65534\n65534\n65534\n")
    assert run(nobody_sock, ["id", "-u"], uid=65534, gid=65534)[:2] == (0, b"65534\n")


@needs_root
@pytest.mark.parametrize("ids", [dict(uid=0), dict(uid=0, gid=0), dict(uid=1000), dict(uid=65534, gid=0)])
def test_the_socket_holder_cannot_choose_another_identity(nobody_sock, ids):
    """The attack of the job's user with its own socket: asking for root (or anyone else) is refused."""
    with pytest.raises(AgentError, match="refusing"):
        run(nobody_sock, ["id"], **ids)


@needs_root
def test_a_hand_written_exec_without_ids_runs_as_the_bound_user(nobody_sock):
    """A raw client on the socket, sending no uid at all, gets the job's user, never the agent's root."""
    frames = []
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(60)
        raw.connect(nobody_sock)
        raw.sendall(open_frame(NONCE))
        decoder = FrameDecoder()

        def until(kind_type):
            while not any(f[0] == CONTROL and f[1]["type"] == kind_type for f in frames):
                frames.extend(decoder.feed(raw.recv(65536)))
            return next(f[1] for f in frames if f[0] == CONTROL and f[1]["type"] == kind_type)

        hello = until("hello")
        raw.sendall(encode_control({"type": "exec", "session": hello["session"], "argv": ["id", "-u"]}))
        payload = until("exit")
    out = b"".join(data for kind, data in frames if kind != CONTROL)
    assert out == b"65534\n" and payload["code"] == 0


@needs_root
def test_the_job_cannot_bind_itself_through_its_own_socket(nobody_sock):
    with pytest.raises(AgentError, match="not served"):
        control.bind(nobody_sock, ROOT, timeout=10)
    assert run(nobody_sock, ["id", "-u"])[:2] == (0, b"65534\n")


@needs_root
def test_the_first_bind_wins(nobody_run_dir):
    ctl = os.path.join(nobody_run_dir, "control.sock")
    control.bind(ctl, NOBODY, timeout=10)  # the same again: idempotent, as a re-run prepare does
    with pytest.raises(AgentError, match="already bound to 65534:65534"):
        control.bind(ctl, ROOT, timeout=10)


@needs_root
def test_root_only_where_the_bind_allows_it():
    with agent_in_tmpdir(control.Identity(65534, 65534, (65534,), root=True), sockets=1) as directory:
        sock = agent_socket_path(directory, 0)
        assert run(sock, ["id", "-u"])[:2] == (0, b"65534\n")
        assert run(sock, ["id", "-u"], uid=0)[:2] == (0, b"0\n")
        with pytest.raises(AgentError, match="refusing"):
            run(sock, ["id"], uid=1000)


def test_an_unbound_agent_runs_nothing():
    with agent_in_tmpdir(None, sockets=1) as directory:
        with pytest.raises(AgentError, match="not been told whose job"):
            run(agent_socket_path(directory, 0), ["true"])


@needs_root
def test_cwd_is_entered_with_the_users_rights(nobody_sock, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code, _, err = run(nobody_sock, ["pwd"], cwd=str(private))
    assert code == 126 and b"Permission denied" in err


def test_the_socket_is_private(sock):
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def _ignore_and_block():
    """What nohup, a cron or an init script may hand the agent: signals ignored and blocked."""
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGUSR2])


def test_the_payload_starts_with_default_signals_whatever_the_agent_inherited():
    with agent_in_tmpdir(ROOT, sockets=1, preexec_fn=_ignore_and_block) as directory:
        sock = agent_socket_path(directory, 0)
        code, out, _ = run(sock, ["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"])
        assert code == 0 and out == b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
        # and so a shell can trap HUP (POSIX forbids trapping a signal ignored on entry)
        trap = "trap 'echo trapped; exit 3' HUP; kill -HUP $$; sleep 5"
        assert run(sock, ["sh", "-c", trap])[:2] == (3, b"trapped\n")
