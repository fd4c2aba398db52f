"""Round trip and stdout throughput through the guest agent and its client.

    python bench/bench_agent.py                       # a local agent on a temporary UNIX socket
    python bench/bench_agent.py --socket RUN/agent.0.sock   # an agent that is already up (a guest)

Targets on a real guest: a trivial command's round trip at most 50 ms, stdout at least 50 MB/s.
A local agent measures the agent and client themselves, without the virtio channel.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from blahvm.guest import agent, control
from blahvm.guest.client import run_payload, wait_ready

TARGET_ROUND_TRIP_MS = 50.0
TARGET_THROUGHPUT_MBS = 50.0


def round_trips(sock, count):
    """Seconds for each of ``count`` runs of /bin/true (connect, hello, exec, exit, hang up)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    timings = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            code = run_payload(sock, ["/bin/true"], stdout=devnull, stderr=devnull, ready_timeout=60)
            timings.append(time.perf_counter() - started)
            assert code == 0, code
    finally:
        os.close(devnull)
    return timings


def throughput(sock, megabytes):
    """MB/s of stdout relayed from ``dd`` beside the agent to /dev/null here (dd, not head:
    busybox's head in the demo guest is slower than the channel)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        blocks = megabytes * 1000 * 1000 // 65536
        size = blocks * 65536
        argv = ["dd", "if=/dev/zero", "bs=65536", "count=%d" % blocks]
        started = time.perf_counter()
        code = run_payload(sock, argv, stdout=devnull, stderr=devnull, ready_timeout=60)
        elapsed = time.perf_counter() - started
        assert code == 0, code
    finally:
        os.close(devnull)
    return size / elapsed / 1e6


def local_agent(directory):
    """A copy of agent.py, alone, serving a socket in ``directory`` (as in a guest image)."""
    script = os.path.join(directory, "agent.py")
    shutil.copy(agent.__file__, script)
    sock = os.path.join(directory, "agent.0.sock")
    ctl = os.path.join(directory, "control.sock")
    process = subprocess.Popen(
        [shutil.which("python3", path="/usr/bin:/bin") or sys.executable, "-I", script, "--listen", sock,
         "--control-listen", ctl],
        stderr=subprocess.DEVNULL,
    )
    control.bind(ctl, control.Identity(os.getuid(), os.getgid(), (os.getgid(),)), timeout=30)  # as prepare does
    wait_ready(sock, timeout=30)
    return process, sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="an agent socket that is already served (default: start a local agent)")
    parser.add_argument("--runs", type=int, default=50, help="round trips to time (default 50)")
    parser.add_argument("--megabytes", type=int, default=200, help="stdout volume to relay (default 200 MB)")
    options = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="blahvm-bench-agent-")
    process = None
    try:
        if options.socket:
            sock, where = options.socket, options.socket
        else:
            process, sock = local_agent(directory)
            where = "local agent (UNIX socket, no virtio)"
        round_trips(sock, 3)  # warm up
        timings = sorted(round_trips(sock, options.runs))
        median_ms = statistics.median(timings) * 1000
        p90_ms = timings[int(len(timings) * 0.9) - 1] * 1000
        rate = max(throughput(sock, options.megabytes) for _ in range(3))
        print("agent benchmark against %s" % where)
        print("  round trip of /bin/true: median %.1f ms, p90 %.1f ms, best %.1f ms over %d runs  (target <= %.0f ms)"
              % (median_ms, p90_ms, timings[0] * 1000, len(timings), TARGET_ROUND_TRIP_MS))
        print("  stdout throughput: %.0f MB/s, best of 3 x %d MB  (target >= %.0f MB/s)"
              % (rate, options.megabytes, TARGET_THROUGHPUT_MBS))
        met = median_ms <= TARGET_ROUND_TRIP_MS and rate >= TARGET_THROUGHPUT_MBS
        print("  targets %s" % ("met" if met else "NOT met"))
        return 0
    finally:
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
