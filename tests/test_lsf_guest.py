"""One whole LSF job on a real guest, every hook run as LSF runs it (tests/lsf_harness.py):
esub as the user -> PRE_EXEC as root -> JOB_STARTER as the user (a command, then a job script
file) -> a job run as sbatchd runs it (PRE_EXEC in its process group, then the starter), stopped and
continued as bstop/bresume do: its guest paused and resumed -> POST_EXEC, and nothing of the job left
behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from blahvm.config import load_config
from blahvm.ledger import Ledger
from tests import lsf_harness as lsf

pytestmark = pytest.mark.guest



def virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def site(demo_image):
    directory = tempfile.mkdtemp(prefix="blahvm-lsf-guest-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-test-lsf-{os.getpid()}"
    config, serverdir = lsf.write_guest_site(directory, pool, demo_image)
    result = lsf.install(serverdir, config, os.path.join(directory, "cache"))
    assert result.returncode == 0, result.stderr
    yield {"dir": directory, "serverdir": serverdir, "pool": pool}
    for name in virsh("list", "--all", "--name").stdout.split():
        if name.startswith("blahvm-7001"):
            virsh("destroy", name)
            virsh("undefine", name)
    virsh("pool-destroy", pool)
    virsh("pool-undefine", pool)
    shutil.rmtree(directory, ignore_errors=True)


def log_of(site) -> str:
    try:
        with open(os.path.join(site["dir"], "blahvm.log")) as stream:
            return stream.read()
    except FileNotFoundError:
        return "(no log)"


def test_one_whole_job(site):
    serverdir = site["serverdir"]
    # bsub -q grid -P cms -W 5 -a "blahvm(slc4)" ... as nobody
    submitted = lsf.run_esub(serverdir, 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="cms"\nLSB_SUB_RLIMIT_RUN=300\n'
                                        'LSB_SUB_ADDITIONAL="blahvm(slc4)"\n')
    assert submitted.code == 0, submitted.stderr
    assert 'LSB_SUB_QUEUE="short"' in submitted.modify
    # LSF runs it in the queue the esub chose, with the esub's env lines in its environment
    lsf.set_project(serverdir, "7001", "cms")  # what bjobs says: -P cms
    env = lsf.job_env("7001", "short", "nobody", lsf.env_lines(submitted.envfile), LS_SUBCWD="/tmp")
    try:
        assert lsf.run_pre_exec(serverdir, env, timeout=300) == 0, log_of(site)
        assert lsf.run_pre_exec(serverdir, env, timeout=300) == 0, log_of(site)  # a re-run (LSF retries) reuses it

        command_line = """/bin/sh -c 'echo "[$1] $(id -u)"; echo oops >&2; exit 3' x "a 2" """
        job = lsf.run_job_starter(serverdir, env, command_line, "nobody", "/tmp")
        assert (job.returncode, job.stdout, job.stderr) == (3, b"[a 2] 65534\n", b"oops\n")

        # a script job: LSF hands over the single path $LSB_JOBFILENAME.shell
        script = os.path.join(site["dir"], "job.7001.shell")
        with open(script, "w") as stream:
            stream.write("#!/bin/sh\necho script ran in $(uname -s)\nexit 0\n")
        os.chmod(script, 0o644)
        scripted = lsf.run_job_starter(serverdir, dict(env, LSB_JOBFILENAME=script[:-6]), script, "nobody", "/tmp")
        assert (scripted.returncode, scripted.stdout, scripted.stderr) == (0, b"script ran in Linux\n", b"")

        stopped_with_its_job(site, serverdir, env)
    finally:
        assert lsf.run_post_exec(serverdir, env, 3, timeout=300) == 0
    assert not any(n.startswith("blahvm-7001") for n in virsh("list", "--all", "--name").stdout.split())
    assert [v for v in virsh("vol-list", site["pool"]).stdout.split() if "7001" in v] == []
    assert not os.listdir(os.path.join(site["dir"], "run"))
    with Ledger(load_config(os.path.join(site["dir"], "site.yaml")).host) as ledger:
        assert ledger.live() == ()
    with open(os.path.join(site["dir"], "blahvm.log")) as stream:
        log = stream.read()
    assert "pre-exec: job=7001 user=nobody vo=cms" in log and "post-exec: job=7001" in log
    assert lsf.run_post_exec(serverdir, env, 0) == 0  # post-exec again: nothing left, still fine


COUNT = """/bin/sh -c 'i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.2; done; exit 7'"""


def stopped_with_its_job(site, serverdir, env):
    """bstop: volclava SIGSTOPs the job's process group, which PRE_EXEC ran in; PRE_EXEC's follower pauses
    the guest with it (no vcpu time passes), SIGCONT resumes it, and the output and exit code are exact."""
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.stats import domain_usage

    config = load_config(os.path.join(site["dir"], "site.yaml"))
    with Ledger(config.host) as ledger:
        guest = ledger.get("7001").guest
    job = lsf.start_job(serverdir, env, COUNT, "nobody", "/tmp")
    try:
        first = b"".join(job.stdout.readline() for _ in range(3))
        assert first == b"0\n1\n2\n", (first, log_of(site))
        os.killpg(job.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while virsh("domstate", guest).stdout.strip() != "paused":
            assert time.monotonic() < deadline, (virsh("domstate", guest).stdout, log_of(site))
            time.sleep(0.2)
        with open_connection(config.hypervisor.uri, timeout=30) as conn:
            before = domain_usage(conn, guest).vcpu_seconds
            time.sleep(3)
            assert domain_usage(conn, guest).vcpu_seconds == pytest.approx(before, abs=0.05)
        os.killpg(job.pid, signal.SIGCONT)
        rest, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert (job.returncode, first + rest, err) == (7, b"".join(b"%d\n" % i for i in range(30)), b""), log_of(site)
    deadline = time.monotonic() + 60  # the follower sees the job's shell gone within its poll
    while "follow: job=7001 job 7001: its starters have exited; guest paused 1 times" not in log_of(site):
        assert time.monotonic() < deadline, log_of(site)
        time.sleep(0.2)
