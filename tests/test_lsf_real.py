"""The LSF plugin on a real volclava 2.2 (tests/lava_cluster.py) and real guests, set up as docs/lsf.md
says: ``blahvm install lsf``, esub.blahvm with LSB_ESUB_METHOD=blahvm, the elim's resources in
lsf.shared and the ResourceMap, a routing queue ``grid`` and an execution queue ``short`` with
PRE_EXEC / JOB_STARTER / POST_EXEC run as root (``PRE_POST_EXEC_USER = root``). Jobs are submitted
with bsub as ``rbuser`` from a directory of theirs.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from tests.lava_cluster import BINDIR, ENVDIR, FINISHED, Lava, available
from tests.real_batch import SUBMIT_USER, remove_pool_and_its_guests, remove_run_dirs, settle_templates, virsh

pytestmark = pytest.mark.guest

OTHER_MEMORY_MIB = 384  # environment "other": the demo image with more memory than "vm" (256 MiB)
SYSTEM_PYTHON = "/usr/bin/python3"  # every user runs the esub and the starter; the venv's lives under /root
BOOT_ID = "/proc/sys/kernel/random/boot_id"


@pytest.fixture(scope="module")
def lava(demo_image):
    why = available()
    if why:
        pytest.skip(why)
    from blahvm.hypervisor.kvm import resolve_domain_type

    directory = tempfile.mkdtemp(prefix="blahvm-test-lava-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-test-lava-{os.getpid()}"
    vm = yaml.safe_load(demo_image.environment_yaml("vm"))["vm"]
    config = {
        "hypervisor": {"uri": "qemu:///system", "pool": pool, "pool_path": f"{directory}/clones",
                       "domain_type": resolve_domain_type("auto")},
        "host": {"max_guests": 2, "memory": "4GiB", "vcpus": 2, "state_dir": f"{directory}/state",
                 "run_dir": f"/run/blahvm-lava-{os.getpid()}", "log_file": f"{directory}/blahvm.log"},
        "defaults": {"walltime": "1h", "cores": 1},
        "vo_mapping": [{"account": "^(?P<vo>cms|atlas)$"}],
        "environments": {"vm": vm, "other": dict(vm, memory=f"{OTHER_MEMORY_MIB}MiB")},
        "queues": {"grid": {}, "short": {"max_walltime": "10h"}},
        "routes": [
            {"name": "cms-other", "when": {"queue": "grid", "vo": "cms", "environment": "other"},
             "queue": "short", "environment": "other"},
            {"name": "cms-short", "when": {"queue": "grid", "vo": "cms", "walltime": "<= 10h"},
             "queue": "short", "environment": "vm"},
            {"name": "nobody-else", "reject": "no execution environment is offered to this VO"},
        ],
    }
    os.makedirs(f"{directory}/state", mode=0o755)
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    os.chmod(path, 0o644)
    user = pwd.getpwnam(SUBMIT_USER)
    work = os.path.join(directory, "work")
    os.mkdir(work)
    os.chown(work, user.pw_uid, user.pw_gid)
    hooks = os.path.join(directory, "hooks")
    os.mkdir(hooks, 0o755)
    installed = subprocess.run(
        [sys.executable, "-m", "blahvm.cli.main", "install", "lsf", "--serverdir", hooks, "--config", path,
         "--cache-dir", os.path.join(directory, "cache"), "--elim-name", "elim", "--python", SYSTEM_PYTHON,
         "--lsf-envdir", ENVDIR], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    cluster = Lava()
    try:
        cluster.up()
        cluster.run([f"{BINDIR}/bkill", "-u", "all", "0"])  # jobs an interrupted run left queued
        cluster.driver("install-esub", os.path.join(hooks, "esub.blahvm"), "blahvm")
        for resource in ("blahvm_slots", "blahvm_env_vm", "blahvm_env_other"):
            cluster.driver("install-elim", os.path.join(hooks, "elim"), resource)
        # every queue users can reach refuses a job the esub did not route: the routing queue and LSF's
        # default queue have PRE_EXEC too (docs/lsf.md)
        refuse = (f"PRE_EXEC={hooks}/blahvm-pre-exec", "PRE_POST_EXEC_USER=root")
        cluster.driver("queue", "grid", "DESCRIPTION=submit here; blahvm routes to short", *refuse)
        cluster.driver("queue", "normal", "DESCRIPTION=LSF's default queue; blahvm refuses what it did not route",
                       *refuse)
        cluster.driver("queue", "short", f"PRE_EXEC={hooks}/blahvm-pre-exec", f"JOB_STARTER={hooks}/blahvm-job-starter",
                       f"POST_EXEC={hooks}/blahvm-post-exec", "PRE_POST_EXEC_USER=root", "RUNLIMIT=600")
        cluster.site = {"config": path, "dir": directory, "work": work, "pool": pool,
                        "run_dir": config["host"]["run_dir"], "hooks": hooks}
        yield cluster
    finally:
        # The queues and the elim's resources stay defined (the next run replaces them; removing a queue
        # waits on mbatchd for minutes); no esub is left to refuse other people's bsub.
        cluster.driver("install-esub", "--remove")
        cluster.driver("down", check=False)
        remove_pool_and_its_guests(pool)
        shutil.rmtree(directory, ignore_errors=True)
        remove_run_dirs(config["host"]["run_dir"])


def _log(lava) -> str:
    try:
        with open(os.path.join(lava.site["dir"], "blahvm.log")) as stream:
            return stream.read()[-4000:]
    except OSError:
        return "(no blahvm log)"


def _output(path: str) -> str:
    """The job's own output in an LSF -o file (LSF puts its report around it)."""
    with open(path, errors="replace") as stream:
        text = stream.read()
    marker = "The output (if any) follows:\n\n"
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.split("\n\nPS:\n", 1)[0]
    return text


def _nothing_left(lava):
    site = lava.site
    settle_templates(site["config"])
    volumes = virsh("vol-list", site["pool"]).stdout
    assert ".qcow2" not in volumes, volumes
    assert not os.path.isdir(site["run_dir"]) or os.listdir(site["run_dir"]) == []
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    with Ledger(load_config(site["config"]).host) as ledger:
        assert [entry.job_id for entry in ledger.live()] == []


def _settled(lava, timeout: float = 120):
    """Wait until POST_EXEC has torn every guest down."""
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    config = load_config(lava.site["config"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Ledger(config.host) as ledger:
            if not ledger.live():
                return
        time.sleep(0.5)
    raise AssertionError(f"guests still live after {timeout}s\n{_log(lava)}")


def _submit(lava, args, **options) -> str:
    """bsub from the site's directory (root's: not shared with the guest) with output into the user's.

    The daemons run under ``ip netns exec``, which gives them a mount namespace of their own: a share
    PRE_EXEC pins there is not what libvirt's virtiofsd sees, so these jobs share no directory. Real
    daemons run in the host's mount namespace; the share itself is tested in tests/test_jobfiles.py.
    """
    work = lava.site["work"]
    submitted = lava.bsub(["-o", f"{work}/%J.out", "-e", f"{work}/%J.err", *args], cwd=lava.site["dir"], **options)
    assert submitted.returncode == 0, (submitted.stdout, submitted.stderr)
    return lava.job_id(submitted)


def test_command_job_runs_in_a_guest_with_its_output_and_exit_code(lava):
    job_id = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c",
                            f"cat {BOOT_ID}; id -u; echo to-stderr >&2; exit 3"])
    fields = lava.wait(job_id)
    assert fields["STAT"] == "EXIT" and fields["QUEUE"] == "short", (fields, _log(lava))
    assert lava.exit_status(job_id) == 3, _log(lava)
    work = lava.site["work"]
    boot_id, uid = _output(f"{work}/{job_id}.out").split()
    with open(BOOT_ID) as stream:
        assert boot_id != stream.read().strip()  # another kernel answered: the guest's
    assert uid == str(pwd.getpwnam(SUBMIT_USER).pw_uid)
    with open(f"{work}/{job_id}.err") as stream:
        assert stream.read() == "to-stderr\n"
    _settled(lava)
    _nothing_left(lava)


def test_script_job_runs_in_a_guest(lava):
    script = "#!/bin/sh\necho script in $(uname -r)\nexit 5\n"
    job_id = _submit(lava, ["-q", "grid", "-P", "cms"], input=script)
    fields = lava.wait(job_id)
    assert fields["QUEUE"] == "short" and lava.exit_status(job_id) == 5, (fields, _log(lava))
    output = _output(f"{lava.site['work']}/{job_id}.out")
    assert output.startswith("script in ") and os.uname().release not in output, output
    _settled(lava)
    _nothing_left(lava)


def test_rejection_reaches_the_user_with_its_reason(lava):
    rejected = lava.bsub(["-q", "grid", "-P", "atlas2", "/bin/true"], cwd=lava.site["dir"])
    assert rejected.returncode != 0 and "Job <" not in rejected.stdout
    assert "blahvm: job rejected: no execution environment is offered to this VO" in rejected.stderr, rejected.stderr


def test_the_project_comes_from_lsf_not_from_the_users_environment(lava):
    """volclava sets no LSB_PROJECT_NAME: a -P cms job runs whatever the submitter's environment says."""
    job_id = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", "exit 4"], env={"LSB_PROJECT_NAME": "atlas"})
    fields = lava.wait(job_id)
    assert fields["PROJ_NAME"] == "cms" and lava.exit_status(job_id) == 4, (fields, _log(lava))
    _settled(lava)
    _nothing_left(lava)


def test_two_guests_run_at_once_on_max_guests_2(lava):
    """The elim reports the guest slots, the esub reserves one per job: 4 jobs on 2 slots, 2 at a time."""
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    ids = [_submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", "sleep 15"]) for _ in range(4)]
    host = load_config(lava.site["config"]).host
    most = 0
    deadline = time.monotonic() + 900
    while not all(lava.job(job_id).get("STAT") in ("DONE", "EXIT") for job_id in ids):
        assert time.monotonic() < deadline, [lava.job(job_id) for job_id in ids]
        with Ledger(host) as ledger:
            most = max(most, len(ledger.live()))
        time.sleep(0.5)
    for job_id in ids:
        lava.wait(job_id)
    assert [lava.exit_status(job_id) for job_id in ids] == [0, 0, 0, 0], _log(lava)
    assert most == 2, _log(lava)
    _settled(lava)
    _nothing_left(lava)


def test_a_job_that_skips_the_esub_never_runs_on_the_host(lava):
    """LSB_ESUB_METHOD=none skips the esub; an esub that cannot be executed (exit 126) lets the job through:
    either way the job carries no blahvm slot in LSF's record, and every queue's PRE_EXEC ends it (99)."""
    work = lava.site["work"]
    broken = os.path.join(lava.site["dir"], "esub-broken")
    with open(broken, "w") as stream:
        stream.write("#!/nonexistent/python3 -IS\n")  # as an interpreter under a 0700 home
    os.chmod(broken, 0o755)
    tried = {}
    skip = {"LSB_ESUB_METHOD": "none"}
    for name, args, env in (("routing", ["-q", "grid"], skip), ("execution", ["-q", "short"], skip),
                            ("default", [], skip)):
        tried[name] = _submit(lava, [*args, "-P", "cms", "/bin/touch", f"{work}/ran-{name}"], env=env)
    lava.driver("install-esub", broken, "blahvm")
    try:
        tried["broken-esub"] = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/touch", f"{work}/ran-broken-esub"])
    finally:
        lava.driver("install-esub", os.path.join(lava.site["hooks"], "esub.blahvm"), "blahvm")
    for name, job_id in tried.items():
        fields = lava.wait(job_id)
        assert fields["STAT"] == "EXIT" and lava.exit_status(job_id) == 99, (name, fields, _log(lava))
        assert not os.path.exists(f"{work}/ran-{name}"), (name, _log(lava))
        with open(os.path.join(lava.site["dir"], "blahvm.log")) as stream:
            assert f"job {job_id} was not routed by blahvm" in stream.read(), (name, _log(lava))
        # the reason reaches the user: PRE_EXEC appends it to the job's -e file, before LSF's report
        with open(f"{work}/{job_id}.err") as stream:
            assert stream.read().startswith(f"blahvm: job {job_id} did not start: job {job_id} was not routed by "
                                            "blahvm"), (name, _log(lava))
    _nothing_left(lava)


def test_the_environment_asked_for_is_the_guests(lava):
    """-a "blahvm(other)" gets a guest of environment other (more memory than vm's); an environment the
    site does not have is refused at bsub, named."""
    meminfo = "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"
    asked = _submit(lava, ["-q", "grid", "-P", "cms", "-a", "blahvm(other)", "/bin/sh", "-c", meminfo])
    default = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", meminfo])
    for job_id in (asked, default):
        fields = lava.wait(job_id)
        assert fields["QUEUE"] == "short" and lava.exit_status(job_id) == 0, (fields, _log(lava))
    work = lava.site["work"]
    other, vm = (int(_output(f"{work}/{job_id}.out")) for job_id in (asked, default))
    assert 256 * 1024 < other <= OTHER_MEMORY_MIB * 1024 and vm <= 256 * 1024, (other, vm)
    rejected = lava.bsub(["-q", "grid", "-P", "cms", "-a", "blahvm(el7)", "/bin/true"], cwd=lava.site["dir"])
    assert rejected.returncode != 0 and "Job <" not in rejected.stdout
    assert ("blahvm: job rejected: environment el7 does not exist here (asked for with -a \"blahvm(el7)\" or "
            "$BLAHVM_ENVIRONMENT); this site offers other, vm") in rejected.stderr, rejected.stderr
    _settled(lava)
    _nothing_left(lava)


def _running_in_guest(lava, job_id, lines: int = 1, timeout: float = 300):
    """Wait until the job runs and its payload in the guest has written ``lines`` lines (bpeek)."""
    deadline = time.monotonic() + timeout
    while True:
        fields = lava.job(job_id)
        assert fields.get("STAT") not in FINISHED, (fields, _log(lava))
        if fields.get("STAT") == "RUN":
            peek = lava.run([f"{BINDIR}/bpeek", job_id], user=SUBMIT_USER).stdout
            if len([line for line in peek.splitlines() if line.isdigit() or line == "started"]) >= lines:
                return
        assert time.monotonic() < deadline, (fields, _log(lava))
        time.sleep(0.5)


def test_bkill_of_a_running_job_leaves_nothing(lava):
    job_id = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", "echo started; sleep 600"])
    _running_in_guest(lava, job_id)
    killed = lava.run([f"{BINDIR}/bkill", job_id], user=SUBMIT_USER)
    assert killed.returncode == 0, (killed.stdout, killed.stderr)
    fields = lava.wait(job_id, timeout=180)
    # bkill sends SIGINT, SIGTERM, SIGKILL to the job's processes; the starter passes the first to the
    # payload in the guest and exits 128 + 2 with it
    assert fields["STAT"] == "EXIT" and lava.exit_status(job_id) == 130, (fields, lava.exit_status(job_id), _log(lava))
    assert _output(f"{lava.site['work']}/{job_id}.out") == "started\n"
    _settled(lava)
    _nothing_left(lava)


def test_bstop_pauses_the_guest_and_bresume_resumes_it(lava):
    """volclava stops the job's processes (SIGSTOP); PRE_EXEC's follower pauses the guest with them:
    no CPU time passes in it until bresume, and the job ends with its exact output and exit code."""
    from blahvm.config import load_config
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.stats import domain_usage
    from blahvm.ledger import Ledger

    count = "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.2; done; exit 7"
    job_id = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", count])
    _running_in_guest(lava, job_id, lines=3)
    config = load_config(lava.site["config"])
    with Ledger(config.host) as ledger:
        guest = ledger.get(job_id).guest
    stopped = lava.run([f"{BINDIR}/bstop", job_id], user=SUBMIT_USER)
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    with open_connection(config.hypervisor.uri, timeout=30) as conn:
        deadline = time.monotonic() + 60
        while virsh("domstate", guest).stdout.strip() != "paused":
            assert time.monotonic() < deadline, (lava.job(job_id), virsh("domstate", guest).stdout, _log(lava))
            time.sleep(0.2)
        assert lava.job(job_id)["STAT"] == "USUSP"
        before = domain_usage(conn, guest).vcpu_seconds
        time.sleep(4)
        assert domain_usage(conn, guest).vcpu_seconds == pytest.approx(before, abs=0.05)
        assert lava.job(job_id)["STAT"] == "USUSP"
    resumed = lava.run([f"{BINDIR}/bresume", job_id], user=SUBMIT_USER)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    fields = lava.wait(job_id)
    assert fields["STAT"] == "EXIT" and lava.exit_status(job_id) == 7, (fields, _log(lava))
    assert _output(f"{lava.site['work']}/{job_id}.out") == "".join(f"{i}\n" for i in range(30))
    _settled(lava)
    deadline = time.monotonic() + 60  # the follower sees the job's shell gone within its poll
    while f"follow: job={job_id} job {job_id}: its starters have exited; guest paused 1 times" not in _log(lava):
        assert time.monotonic() < deadline, _log(lava)
        time.sleep(0.5)
    _nothing_left(lava)


# Burns 2 s of CPU as the guest's own clock counts it (utime+stime of the shell and its children, in
# USER_HZ = 100 ticks), then prints what it counted (as tests/test_accounting.py).
BURN = ('while :; do set -- $(cat /proc/$$/stat); t=$((${14}+${15}+${16}+${17})); [ $t -ge 200 ] && break; '
        'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; done; echo $t')


def _lsf_cpu_seconds(lava, job_id) -> float:
    """What volclava recorded of the job's CPU time: ``bjobs -json -o cpu_used`` (volclava has no bacct)."""
    done = lava.run([f"{BINDIR}/bjobs", "-a", "-json", "-o", "jobid cpu_used", job_id])
    hours, minutes, seconds = json.loads(done.stdout)["RECORDS"][0]["CPU_USED"].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_the_guests_usage_is_in_blahvms_record_not_in_lsfs(lava):
    """volclava counts the job's processes on the host (the starter); the guest's CPU is in blahvm's record
    (docs/lsf.md, "Usage")."""
    job_id = _submit(lava, ["-q", "grid", "-P", "cms", "/bin/sh", "-c", BURN])
    fields = lava.wait(job_id)
    assert lava.exit_status(job_id) == 0, (fields, _log(lava))
    ticks = int(_output(f"{lava.site['work']}/{job_id}.out"))
    _settled(lava)
    listed = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "accounting", "--config", lava.site["config"],
                             "--job-id", job_id, "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    (record,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (record["job_id"], record["user"], record["vo"], record["environment"]) == (job_id, SUBMIT_USER, "cms", "vm")
    lsf_cpu = _lsf_cpu_seconds(lava, job_id)
    print(f"guest counted {ticks / 100:.2f} s of CPU; blahvm's record {record['cpu_seconds']:.2f} s of QEMU, "
          f"{record['vcpu_seconds']:.2f} s of vcpu "
          f"(provision {record['provision_seconds']:.2f} s, wall {record['wall_seconds']:.2f} s); "
          f"volclava's CPU_T {lsf_cpu:.2f} s")
    assert ticks >= 200 and record["cpu_seconds"] > lsf_cpu, (ticks, record, lsf_cpu)
    _nothing_left(lava)
