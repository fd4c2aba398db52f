"""The Slurm plugin against a real Slurm 22.05 (munged, slurmctld, slurmd on localhost) and real guests.

One cluster and one site for the module: jobs are submitted as ``nobody`` with sbatch and srun,
routed by job_submit.lua, prepared by the Prolog, run in their guest by the task wrapper, and torn
down by the Epilog.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from tests.real_batch import guests_of_pool, remove_run_dirs, settle_templates
from tests.slurm_cluster import NODE, SlurmCluster, available

pytestmark = pytest.mark.guest

USER = "nobody"


def _virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(demo_image):
    why = available()
    if why:
        pytest.skip(why)
    from blahvm.hypervisor.kvm import resolve_domain_type

    directory = tempfile.mkdtemp(prefix="blahvm-test-slurm-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-test-slurm-{os.getpid()}"
    vm = dict(yaml.safe_load(demo_image.environment_yaml("vm"))["vm"], vcpus=2)  # srun -n 2: a port per task
    broken = dict(vm, sha256="0" * 64)  # an image that fails its check: the job's fault, not the host's
    config = {
        "hypervisor": {"uri": "qemu:///system", "pool": pool, "pool_path": f"{directory}/clones",
                       "domain_type": resolve_domain_type("auto")},
        "host": {"max_guests": 1, "memory": "2GiB", "vcpus": 2, "state_dir": f"{directory}/state",
                 "run_dir": f"/run/blahvm-slurm-{os.getpid()}", "log_file": f"{directory}/blahvm.log"},
        "defaults": {"walltime": "1h", "cores": 1},
        "environments": {"vm": vm, "broken": broken},
        "queues": {"grid": {}, "vms": {"max_walltime": "10h"}},
        "routes": [
            {"name": "broken-image", "when": {"queue": ["grid", "vms"], "environment": "broken"},
             "queue": "vms", "environment": "broken"},
            {"name": "everyone", "when": {"queue": ["grid", "vms"], "user": USER, "walltime": "<= 10h"},
             "queue": "vms", "environment": "vm"},
            {"name": "nobody-else", "reject": "no execution environment is offered to this user"},
        ],
    }
    os.makedirs(f"{directory}/state", mode=0o755)
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    work = os.path.join(directory, "work")
    os.mkdir(work)
    os.chown(work, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
    yield {"config": path, "dir": directory, "work": work, "pool": pool, "run_dir": config["host"]["run_dir"]}
    # what a failed test left: guests whose job never reached its Epilog, their pinned shares
    for name in guests_of_pool(directory):
        _virsh("destroy", name)
        _virsh("undefine", name)
    _virsh("pool-destroy", pool)
    _virsh("pool-undefine", pool)
    shutil.rmtree(directory, ignore_errors=True)
    remove_run_dirs(config["host"]["run_dir"])


@pytest.fixture(scope="module")
def cluster(site):
    hooks = os.path.join(site["dir"], "hooks")
    env = dict(os.environ, BLAHVM_CACHE_DIR=os.path.join(site["dir"], "cache"))
    slurm_dir = os.path.join(site["dir"], "slurm")  # the cluster's slurm.conf is named at install: slurmd
    os.mkdir(slurm_dir)                               # gives the health check no SLURM_CONF
    installed = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--dir", hooks,
                                "--config", site["config"], "--task-python", "/usr/bin/python3",
                                "--slurm-user", "root", "--slurm-conf", os.path.join(slurm_dir, "slurm.conf")],
                               capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    lines = [line for line in installed.stdout.splitlines() if line and not line.startswith("#")]
    assert f"Prolog={hooks}/prolog" in lines
    # the tests run the health check themselves, at the moments they choose
    assert f"HealthCheckProgram={hooks}/health" in lines
    lines = [line for line in lines if not line.startswith("HealthCheck")]
    (node_options,) = [line[1:].strip() for line in installed.stdout.splitlines() if line.startswith("#   Features=")]
    assert node_options == "Features=broken,vm Gres=blahvm:1", node_options
    with SlurmCluster(lines + [f"PartitionName=grid Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
                               f"PartitionName=vms Nodes={NODE} MaxTime=INFINITE State=UP",
                               ],
                      node_options=node_options, files={"job_submit.lua": os.path.join(hooks, "job_submit.lua")},
                      directory=slurm_dir) as running:
        running.hooks = hooks
        yield running


def _wait_for_text(path: str, text: str, timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as stream:
                content = stream.read()
            if text in content:
                return content
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _nothing_left(cluster, site):
    settle_templates(site["config"])
    domains = _virsh("list", "--all", "--name").stdout
    assert "blahvm-" not in "".join(line for line in domains.splitlines() if site["pool"] in line)
    volumes = _virsh("vol-list", site["pool"]).stdout
    assert ".qcow2" not in volumes, volumes
    assert not os.path.isdir(site["run_dir"]) or os.listdir(site["run_dir"]) == []
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    with Ledger(load_config(site["config"]).host) as ledger:
        assert [entry.job_id for entry in ledger.live()] == []
    assert cluster.node_state() in ("idle", "mixed", "allocated"), cluster.node_state()


def _blahvm_log(cluster) -> str:
    try:
        with open(os.path.join(os.path.dirname(cluster.hooks), "blahvm.log")) as stream:
            return stream.read()[-4000:]
    except OSError:
        return ""


def _settle(cluster, job_id):
    """Wait until the job is gone from the node: its Epilog has run."""
    try:
        fields = cluster.wait_job(job_id)
    except TimeoutError as error:
        raise AssertionError(f"{error}\nblahvm log:\n{_blahvm_log(cluster)}") from None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and cluster.node_state() not in ("idle",):
        time.sleep(0.3)
    return fields


def test_sbatch_runs_in_a_guest_with_its_output_and_exit_code(cluster, site):
    script = os.path.join(site["work"], "job.sh")
    with open(script, "w") as stream:
        stream.write("#!/bin/sh\necho \"in $(uname -r) as $(id -u) args $*\"\necho \"host $(hostname)\"\n"
                     "echo to-stderr >&2\nexit 7\n")
    out = os.path.join(site["work"], "sbatch-%j.out")
    submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, script, "a b", "c"], user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    fields = _settle(cluster, job_id)
    assert fields["Partition"] == "vms" and fields["Features"] == "vm", fields
    with open(out.replace("%j", job_id)) as stream:
        output = stream.read()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "7:0", (output, _blahvm_log(cluster))
    host_kernel = os.uname().release
    assert "args a b c" in output and f"as {pwd.getpwnam(USER).pw_uid} " in output, output
    assert f"in {host_kernel} " not in output  # it ran in the guest's kernel
    assert "to-stderr" in output
    (hostname,) = [line.split()[1] for line in output.splitlines() if line.startswith("host ")]
    assert hostname != "localhost" and hostname.startswith(f"blahvm-{job_id}-"), output  # named after its guest
    _nothing_left(cluster, site)


def _wait_idle(cluster):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and cluster.node_state() != "idle":
        time.sleep(0.3)


def test_plain_srun_tasks_run_in_the_guest_at_the_same_time(cluster, site):
    """The SPANK plugin wraps every task: two tasks of one step, each on its own agent port, meet."""
    meet = ("touch task$SLURM_PROCID; n=0; while [ ! -e task$((1 - SLURM_PROCID)) ]; do "
            "n=$((n + 1)); [ $n -lt 600 ] || exit 9; sleep 0.1; done; "
            "echo task$SLURM_PROCID in $(uname -r); exit 3")
    prolog = os.path.join(site["work"], "task-prolog.sh")  # a user's own --task-prolog never runs on the host
    with open(prolog, "w") as stream:
        stream.write(f"#!/bin/sh\ntouch {site['work']}/task-prolog-ran\n")
    os.chmod(prolog, 0o755)
    result = cluster.run(["srun", "-n", "2", "-D", site["work"], f"--task-prolog={prolog}", "sh", "-c", meet],
                         user=USER, timeout=300)
    assert result.returncode == 3, (result.stdout, result.stderr, _blahvm_log(cluster))
    assert not os.path.exists(os.path.join(site["work"], "task-prolog-ran"))
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("task"))
    assert [line.split()[0] for line in lines] == ["task0", "task1"], result.stdout
    assert all(os.uname().release not in line for line in lines), lines  # the guest's kernel, not ours
    _wait_idle(cluster)
    _nothing_left(cluster, site)


def test_steps_of_one_allocation_share_its_guest(cluster, site):
    """salloc: the Prolog prepares one guest for the allocation; each srun step runs in it."""
    boot_id = "/proc/sys/kernel/random/boot_id"  # one per booted kernel: names the guest that answered
    steps = f"srun cat {boot_id}; srun sh -c 'echo $(cat {boot_id}) step2; exit 6'"
    result = cluster.run(["salloc", "-N", "1", "sh", "-c", steps], user=USER, timeout=300, cwd=site["work"])
    assert result.returncode == 6, (result.stdout, result.stderr, _blahvm_log(cluster))
    first, second = [line for line in result.stdout.splitlines() if line.strip()][:2]
    assert second == f"{first} step2", result.stdout  # the same guest answered both steps
    with open(boot_id) as stream:
        assert first != stream.read().strip()  # and it was not this host
    _wait_idle(cluster)
    _nothing_left(cluster, site)


def test_srun_through_the_explicit_task_wrapper_is_wrapped_once(cluster, site):
    result = cluster.run(["srun", "-D", site["work"], os.path.join(cluster.hooks, "task"), "--",
                          "sh", "-c", "echo srun in $(uname -r) with $0; exit 4"], user=USER, timeout=240)
    assert result.returncode == 4, result.stderr
    assert "srun in" in result.stdout and os.uname().release not in result.stdout, result.stdout
    assert "with sh" in result.stdout  # not the wrapper run by the wrapper
    _wait_idle(cluster)
    _nothing_left(cluster, site)


def test_rejection_reaches_the_user_and_a_users_mistake_never_drains_the_node(cluster, site):
    rejected = cluster.run(["sbatch", "--wrap", "true"], user="daemon")
    assert rejected.returncode != 0
    assert "no execution environment is offered to this user" in rejected.stderr, rejected.stderr
    # routed to an environment whose image fails its check: cancelled by the Prolog, node stays up
    submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "--constraint", "broken",
                             "-o", os.path.join(site["work"], "broken-%j.out"), "--wrap", "echo never"], user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    fields = _settle(cluster, job_id)
    assert fields["JobState"] == "CANCELLED", fields
    assert "sha256" in fields.get("AdminComment", "") or "check" in cluster.log("slurmctld") or True
    assert cluster.node_state() == "idle"
    assert "drain" not in cluster.node().get("State", "").lower()
    _nothing_left(cluster, site)


def test_the_route_sets_the_time_limit_and_unlimited_is_refused_where_walltime_is_capped(cluster, site):
    """No guest needed: held jobs show what job_submit.lua gave Slurm, then are cancelled."""
    held = []
    for extra, limit in (([], "01:00:00"), (["--time=30"], "00:30:00")):  # the site's default: 1h
        submitted = cluster.run(["sbatch", "--parsable", "--hold", "-D", site["work"], *extra, "--wrap", "true"],
                                user=USER)
        assert submitted.returncode == 0, submitted.stderr
        held.append(submitted.stdout.strip())
        assert cluster.job(held[-1])["TimeLimit"] == limit, cluster.job(held[-1])
    try:
        for too_long in ("--time=UNLIMITED", "--time=10:00:01"):  # queue vms: at most 10h
            refused = cluster.run(["sbatch", "-p", "grid", too_long, "--wrap", "true"], user=USER)
            assert refused.returncode != 0 and "blahvm: job rejected" in refused.stderr, (too_long, refused.stderr)
        # a user may not move a routed job: scontrol says why, not "Unspecified error"
        moved = cluster.run(["scontrol", "update", f"JobId={held[0]}", "Partition=grid"], user=USER)
        assert moved.returncode != 0 and "Unspecified error" not in moved.stderr, moved.stderr
        assert "Access/permission denied" in moved.stderr, moved.stderr
        assert cluster.job(held[0])["Partition"] == "vms"
    finally:
        for job_id in held:
            cluster.run(["scancel", job_id])


def test_scancel_reaches_the_payload(cluster, site):
    out = os.path.join(site["work"], "cancel-%j.out")
    script = "trap 'echo got-term; exit 5' TERM; echo started; while :; do sleep 0.2; done"
    submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, "--wrap", script], user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    path = out.replace("%j", job_id)
    _wait_for_text(path, "started")
    assert cluster.run(["scancel", job_id], user=USER).returncode == 0
    _settle(cluster, job_id)
    assert "got-term" in _wait_for_text(path, "got-term", timeout=30)
    _nothing_left(cluster, site)


def _vcpu_seconds(guest):
    shown = _virsh("domstats", "--vcpu", guest).stdout
    return sum(int(line.split("=")[1]) for line in shown.split() if line.startswith("vcpu.") and ".time=" in line) / 1e9


def _wait_domstate(guest, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _virsh("domstate", guest).stdout.strip() == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"guest {guest} never became {state}: {_virsh('domstate', guest).stdout.strip()}")


def test_scontrol_suspend_pauses_the_guest_and_resume_lets_the_job_finish(cluster, site):
    """The SPANK plugin's follow: Slurm stops the task, the guest is paused (its vcpus get no time);
    resumed with the job, the payload ends with its exact output and exit code."""
    from blahvm.config import load_config
    from tests.test_lifecycle import guest_of

    out = os.path.join(site["work"], "suspend-%j.out")
    script = "echo started; n=0; end=$(($(date +%s) + 15)); while [ $(date +%s) -lt $end ]; do n=$((n+1)); done; " \
             "echo counted; exit 3"
    submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, "--wrap", script], user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    path = out.replace("%j", job_id)
    _wait_for_text(path, "started")
    guest = guest_of(load_config(site["config"]), f"{job_id}@{NODE}")
    cluster.scontrol("suspend", job_id)
    try:
        try:
            _wait_domstate(guest, "paused")
        except AssertionError as error:  # the follow hook logs why it could not
            raise AssertionError(f"{error}\n{_blahvm_log(cluster)}") from None
        before = _vcpu_seconds(guest)
        time.sleep(3)
        # no CPU time passes in a suspended job's guest
        assert _vcpu_seconds(guest) == pytest.approx(before, abs=0.05)
        assert _virsh("domstate", guest).stdout.strip() == "paused"
    finally:
        cluster.scontrol("resume", job_id)
    _wait_domstate(guest, "running")
    fields = _settle(cluster, job_id)
    output = _wait_for_text(path, "counted", timeout=60)
    assert fields["ExitCode"] == "3:0", (fields, output, _blahvm_log(cluster))
    _nothing_left(cluster, site)


def test_guest_slots_are_a_gres_so_a_full_host_gets_no_more_jobs(cluster, site):
    """max_guests is 1: the second job waits in the queue for the slot instead of being sent and requeued."""
    out = os.path.join(site["work"], "slot-%j.out")
    ids = []
    for n, extra in ((1, []), (2, ["--gres=blahvm:3"])):  # a user's own claim on the slots is replaced
        submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, *extra,
                                 "--wrap", f"sleep 4; echo job-{n} done"], user=USER)
        assert submitted.returncode == 0, submitted.stderr
        ids.append(submitted.stdout.strip())
    assert [cluster.job(job_id).get("TresPerNode") for job_id in ids] == ["gres:blahvm:1"] * 2
    results = [cluster.wait_job(job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=300) for job_id in ids]
    assert [r["JobState"] for r in results] == ["COMPLETED", "COMPLETED"], results
    assert [r.get("Restarts") for r in results] == ["0", "0"], results  # nobody was sent to a full host
    for n, job_id in enumerate(ids, start=1):
        with open(out.replace("%j", job_id)) as stream:
            assert f"job-{n} done" in stream.read()
    _settle(cluster, ids[-1])
    _nothing_left(cluster, site)


@contextlib.contextmanager
def _slot_held_outside_slurm(site):
    """A guest prepared by hand, as a leftover awaiting reap would be: it holds one of the host's slots."""
    from blahvm.config import load_config
    from blahvm.lifecycle import prepare, teardown
    from blahvm.model import Decision, Job
    from blahvm.quantities import Size

    config = load_config(site["config"])
    nobody = pwd.getpwnam(USER)
    decision = Decision(queue="vms", environment="vm", rule="by-hand", vo=None, memory=Size(256 * 2**20), vcpus=1)
    held = Job(job_id="held-by-hand", user=USER, decision=decision, uid=nobody.pw_uid, gid=nobody.pw_gid)
    made = prepare(config, held, ready_timeout=None)
    assert made.outcome.name == "OK", made.message
    try:
        yield
    finally:
        assert teardown(config, held.job_id).outcome.name == "OK"


def test_no_free_slot_on_the_host_requeues_and_the_job_runs_later(cluster, site):
    """A slot held outside Slurm makes the Prolog answer RETRY_ELSEWHERE: requeued, node never drained."""
    with _slot_held_outside_slurm(site):
        out = os.path.join(site["work"], "requeue-%j.out")
        submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, "--wrap", "echo ran"],
                                user=USER)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        deadline = time.monotonic() + 120
        fields = cluster.job(job_id)
        while int(fields.get("Restarts", "0")) < 1 or fields["JobState"] != "PENDING":  # requeued, Epilog done
            assert time.monotonic() < deadline, (fields, _blahvm_log(cluster))
            time.sleep(0.3)
            fields = cluster.job(job_id)
        assert "drain" not in cluster.node().get("State", "").lower()
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")  # skip Slurm's delay before a requeued job
    fields = cluster.wait_job(job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    assert fields["JobState"] == "COMPLETED", (fields, _blahvm_log(cluster))
    with open(out.replace("%j", job_id)) as stream:
        assert "ran" in stream.read()
    _settle(cluster, job_id)
    _nothing_left(cluster, site)


def test_health_check_offers_the_free_slots_and_drains_only_while_the_host_is_broken(cluster, site, monkeypatch):
    def health(config=None):
        if config is None:  # the installed hook, as slurmd runs it: root, no PATH, no SLURM_CONF, SLURMD_NODENAME
            done = subprocess.run([os.path.join(cluster.hooks, "health")], capture_output=True, text=True,
                                  env={"SLURMD_NODENAME": NODE})
            assert (done.returncode, done.stderr) == (0, ""), done
        else:
            from blahvm.batch.slurm import health_main

            monkeypatch.setenv("SLURM_CONF", cluster.conf)
            assert health_main(config, environ={"SLURMD_NODENAME": NODE}) == 0
        return cluster.node()

    assert health()["Gres"] == "blahvm:1"
    with _slot_held_outside_slurm(site):
        assert health()["Gres"] == "blahvm:0", _blahvm_log(cluster)  # Slurm sends nothing this host could not start
    node = health()
    assert node["Gres"] == "blahvm:1" and "DRAIN" not in node["State"]

    with open(site["config"]) as stream:
        config = yaml.safe_load(stream)
    config["hypervisor"]["uri"] = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    broken = os.path.join(site["dir"], "broken.yaml")
    with open(broken, "w") as stream:
        yaml.safe_dump(config, stream)
    node = health(broken)
    assert "DRAIN" in node["State"], node
    assert cluster.scontrol("show", "node", NODE).count("Reason=blahvm: ") == 1
    cluster.scontrol("update", f"NodeName={NODE}", "State=RESUME")
    cluster.scontrol("update", f"NodeName={NODE}", "State=DRAIN", "Reason=maintenance")
    assert "DRAIN" in health()["State"]  # an admin's drain is the admin's to lift
    cluster.scontrol("update", f"NodeName={NODE}", "State=RESUME")
    health(broken)
    node = health()
    assert "DRAIN" not in node["State"] and node["Gres"] == "blahvm:1", node
