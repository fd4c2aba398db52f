"""The guest charged to its job on a real Slurm 22.05 with its cgroup plugins and accounting database.

One cluster (proctrack/cgroup, task/cgroup, jobacct_gather/cgroup, PrologFlags=Contain, slurmdbd on its
own MariaDB) and one guest: the SPANK plugin's charge hook moves the guest's QEMU into the job's extern
step cgroups; then the job's CPU in ``sacct`` is the guest's, ``scontrol suspend`` freezes the guest
with the job, and blahvm's own record still counts what the guest ran.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from tests.real_batch import guests_of_pool
from tests.slurm_cluster import NODE, SlurmCluster, available
from tests.slurm_dbd import SlurmDbd, available as dbd_available

pytestmark = pytest.mark.guest

USER = "nobody"
CGROUP_CONF = "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=yes\nConstrainRAMSpace=yes\n"
# sleep until the test has read the guest's usage, then burn 8 s of the guest's own CPU, print it, exit 3
BURN = ("sleep 4; while :; do set -- $(cat /proc/$$/stat); t=$((${14}+${15}+${16}+${17})); "
        "[ $t -ge 800 ] && break; i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; done; echo burnt $t; exit 3")


def _virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(demo_image):
    why = available() or dbd_available()
    if why:
        pytest.skip(why)
    if not os.path.isdir("/sys/fs/cgroup/freezer"):
        pytest.skip("this test runs Slurm's cgroup v1 plugins: no v1 freezer hierarchy on this host")
    from blahvm.hypervisor.kvm import resolve_domain_type

    directory = tempfile.mkdtemp(prefix="blahvm-test-slurmcg-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-test-slurmcg-{os.getpid()}"
    vm = yaml.safe_load(demo_image.environment_yaml("vm"))["vm"]
    config = {
        "hypervisor": {"uri": "qemu:///system", "pool": pool, "pool_path": f"{directory}/clones",
                       "domain_type": resolve_domain_type("auto")},
        "host": {"max_guests": 1, "memory": "2GiB", "vcpus": 2, "state_dir": f"{directory}/state",
                 "run_dir": f"/run/blahvm-slurmcg-{os.getpid()}", "log_file": f"{directory}/blahvm.log"},
        "defaults": {"walltime": "1h", "cores": 1},
        "environments": {"vm": vm},
        "queues": {"grid": {}, "vms": {"max_walltime": "10h"}},
        "routes": [{"name": "everyone", "when": {"queue": ["grid", "vms"], "user": USER},
                    "queue": "vms", "environment": "vm"}],
    }
    os.makedirs(f"{directory}/state", mode=0o755)
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    work = os.path.join(directory, "work")
    os.mkdir(work)
    os.chown(work, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
    yield {"config": path, "dir": directory, "work": work, "pool": pool, "memory": vm["memory"]}
    for name in guests_of_pool(directory):  # what a failed test left
        _virsh("destroy", name)
        _virsh("undefine", name)
    _virsh("pool-destroy", pool)
    _virsh("pool-undefine", pool)
    shares = config["host"]["run_dir"] + "-shares"
    with open("/proc/self/mountinfo") as stream:
        mounted = [line.split()[4] for line in stream if line.split()[4].startswith(shares + "/")]
    for point in sorted(mounted, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(config["host"]["run_dir"], ignore_errors=True)
    shutil.rmtree(shares, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(site):
    hooks = os.path.join(site["dir"], "hooks")
    env = dict(os.environ, BLAHVM_CACHE_DIR=os.path.join(site["dir"], "cache"))
    slurm_dir = os.path.join(site["dir"], "slurm")
    os.mkdir(slurm_dir)
    installed = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--dir", hooks,
                                "--config", site["config"], "--task-python", "/usr/bin/python3",
                                "--slurm-user", "root", "--slurm-conf", os.path.join(slurm_dir, "slurm.conf")],
                               capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    printed = installed.stdout.splitlines()
    lines = [line for line in printed if line and not line.startswith("#") and not line.startswith("HealthCheck")]
    # the cgroup site's PrologFlags, as the install's comment gives them
    (flags,) = [line.split("PrologFlags=", 1)[1] for line in printed if line.startswith("# with Slurm's cgroup plugins")]
    flags = "PrologFlags=" + flags.split()[0]
    lines = [line for line in lines if not line.startswith("PrologFlags=")] + [flags]
    (node_options,) = [line[1:].strip() for line in printed if line.startswith("#   Features=")]
    cgroup_conf = os.path.join(site["dir"], "cgroup.conf")
    with open(cgroup_conf, "w") as stream:
        stream.write(CGROUP_CONF)
    dbd = SlurmDbd()
    extra = lines + dbd.lines(os.path.join(slurm_dir, "munge", "munge.socket")) + [
        "ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup", "JobAcctGatherType=jobacct_gather/cgroup",
        "SelectTypeParameters=CR_Core_Memory", f"PartitionName=grid Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName=vms Nodes={NODE} MaxTime=INFINITE State=UP"]
    with SlurmCluster(extra, node_options=node_options, directory=slurm_dir, before_controller=dbd.start,
                      files={"job_submit.lua": os.path.join(hooks, "job_submit.lua"), "cgroup.conf": cgroup_conf}) as running:
        running.hooks = hooks
        yield running
        # a failed test may leave a job running (suspended, even): end it through Slurm, or its slurmstepds
        # would outlive the cluster, holding the job's cgroups
        for job_id in running.run(["squeue", "-h", "-o", "%i"]).stdout.split():
            running.run(["scontrol", "resume", job_id])
            running.run(["scancel", job_id])
        deadline = time.monotonic() + 120
        while running.run(["squeue", "-h", "-o", "%i"]).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)


def _log(site) -> str:
    try:
        with open(os.path.join(site["dir"], "blahvm.log")) as stream:
            return stream.read()[-4000:]
    except OSError:
        return ""


def _until(condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _vcpu_wait(pid: int):
    """Seconds QEMU's vcpu threads have waited on the host's run queue (schedstat), or None once it is gone."""
    from blahvm.hypervisor.process import is_vcpu_thread

    total = None
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as stream:
                if not is_vcpu_thread(stream.read().strip()):
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stream:
                total = (total or 0.0) + int(stream.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


def _seconds(total_cpu: str) -> float:
    """sacct's TotalCPU ([D-][HH:]MM:SS[.mmm]) in seconds."""
    days, _, rest = total_cpu.rpartition("-")
    parts = [float(part) for part in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def test_the_guest_is_the_jobs_in_sacct_in_suspension_and_in_blahvms_record(cluster, site):
    from blahvm.config import load_config
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.process import cpu_seconds_of, qemu_pid
    from blahvm.jobcgroup import frozen
    from blahvm.hypervisor.stats import domain_usage
    from blahvm.lifecycle import accounting
    from tests.test_lifecycle import guest_of

    config = load_config(site["config"])
    out = os.path.join(site["work"], "burn-%j.out")
    submitted = cluster.run(["sbatch", "--parsable", "-D", site["work"], "-o", out, "--wrap", BURN],
                            user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    key = f"{job_id}@{NODE}"
    guest = guest_of(config, key)

    # the charge hook has moved every thread of QEMU into the extern step's cgroups
    with open_connection(config.hypervisor.uri, timeout=30) as conn:
        pid = _until(lambda: qemu_pid(conn, guest), "the guest's QEMU")

        def charged():
            try:
                with open(f"/proc/{pid}/cgroup") as stream:
                    lines = stream.read().splitlines()
            except OSError:
                return None
            return lines if all(f"/job_{job_id}/step_extern" in line for line in lines
                                if line.split(":")[1] in ("freezer", "cpuacct", "memory")) else None

        try:
            placed = _until(charged, "QEMU in the job's extern step cgroups", timeout=180)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_log(site)}") from None
        assert _until(lambda: f"charge {key}: guest {guest} (QEMU {pid}) moved into " in _log(site), "the hook's log line")
        threads = os.listdir(f"/proc/{pid}/task")
        for tid in threads:  # every thread, vcpus included, not only the process
            with open(f"/proc/{pid}/task/{tid}/cgroup") as stream:
                assert f"job_{job_id}/step_extern" in stream.read()
        start = domain_usage(conn, guest)
        first_wait = _vcpu_wait(pid)

        # scontrol suspend freezes the guest with the job: QEMU gets no CPU time for 10 s. Read from /proc:
        # libvirt's statistics ask QEMU's monitor, which a frozen QEMU does not answer until it thaws
        _until(lambda: cpu_seconds_of(pid) > start.cpu_seconds + 1.0, "the guest to burn")
        cluster.scontrol("suspend", job_id)
        try:
            _until(lambda: frozen(pid), "the job's freezer to take QEMU", timeout=60)
            time.sleep(1)
            before = cpu_seconds_of(pid)
            time.sleep(10)
            after = cpu_seconds_of(pid)
        finally:
            cluster.scontrol("resume", job_id)
        assert after == pytest.approx(before, abs=0.02), (before, after)

    # how long the guest's vcpu waited for a host core, until QEMU is gone: the guest counts that (steal,
    # which TCG does not report to it) as its own CPU, the host does not
    last_wait = first_wait
    while cpu_seconds_of(pid) is not None:
        last_wait = _vcpu_wait(pid) or last_wait
        time.sleep(0.2)
    waited = last_wait - first_wait
    fields = cluster.wait_job(job_id, timeout=600)
    with open(out.replace("%j", job_id)) as stream:
        output = stream.read()
    assert fields.get("ExitCode") == "3:0" and output.startswith("burnt "), (fields, output, _log(site))
    # Slurm killed QEMU with the extern step; the Epilog's teardown removed what was left
    _until(lambda: _virsh("domstate", guest).returncode != 0, "the guest to be removed", timeout=180)
    measured = int(output.split()[1]) / 100  # the guest's own count of the CPU its payload used

    # sacct: the job's TotalCPU holds the guest's (Slurm counted it in the extern step)
    def recorded():
        shown = cluster.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,TotalCPU"]).stdout
        rows = {line.split("|")[0]: line.split("|") for line in shown.splitlines() if line}
        extern = rows.get(f"{job_id}.extern")
        return rows if extern and extern[1] == "COMPLETED" and job_id in rows else None

    rows = _until(recorded, "sacct's record of the job", timeout=120)
    # and Slurm removed the job's cgroups: blahvm's hooks left them in time, QEMU died with the extern step
    import glob

    _until(lambda: not glob.glob(f"/sys/fs/cgroup/*/slurm*/uid_*/job_{job_id}"), "the job's cgroups to go", timeout=60)
    total = _seconds(rows[job_id][2])
    extern = _seconds(rows[f"{job_id}.extern"][2])

    # blahvm's own record: read from QEMU's /proc, not libvirt's cgroup, which lost the moved threads
    _until(lambda: [r for r in accounting(config, job_id=key).records], "blahvm's record", timeout=180)
    (record,) = accounting(config, job_id=key).records
    burnt = record.cpu_seconds - start.cpu_seconds
    print(f"guest measured {measured:.2f}s; sacct TotalCPU {total:.2f}s (extern {extern:.2f}s); "
          f"blahvm {burnt:.2f}s of QEMU since the burn began, {record.vcpu_seconds - start.vcpu_seconds:.2f}s of vcpu, "
          f"{waited:.2f}s of vcpu waiting for a core; "
          f"memory {record.max_memory_bytes / 2**20:.0f} MiB; placed {placed}")
    assert measured >= 8 and total >= 5 and extern >= 5, (measured, rows)
    # within 10 % of what the guest measured; short of it by at most the time its vcpu waited for a host
    # core, which the guest may count as its own CPU (TCG reports no steal to it) and the host does not
    assert record.note is None and 0.9 * measured - waited <= burnt <= 1.1 * measured, (burnt, waited, measured, record)


def test_a_job_whose_memory_limit_cannot_hold_its_guest_keeps_it_outside_and_says_why(cluster, site):
    """--mem equal to the guest's memory leaves nothing for QEMU: the charge hook refuses, the job runs."""
    from blahvm.config import load_config
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.process import qemu_pid
    from blahvm.quantities import Size
    from tests.test_lifecycle import guest_of

    config = load_config(site["config"])
    memory = Size.parse(site["memory"]).mib  # the environment's: routing refuses more
    out = os.path.join(site["work"], "small-%j.out")
    submitted = cluster.run(["sbatch", "--parsable", f"--mem={memory}M", "-D",
                             site["work"], "-o", out, "--wrap", "sleep 3; echo small done"], user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    guest = guest_of(config, f"{job_id}@{NODE}")
    said = _until(lambda: [line for line in _log(site).splitlines()
                           if f"charge {job_id}@{NODE}:" in line and "memory limit" in line], "the charge hook's refusal")
    assert f"is below its guest's {memory}MiB plus 128MiB for QEMU ({memory + 128}MiB)" in said[0], said
    with open_connection(config.hypervisor.uri, timeout=30) as conn:
        pid = qemu_pid(conn, guest)
        if pid is not None:  # still running: in libvirt's cgroups, not the job's
            with open(f"/proc/{pid}/cgroup") as stream:
                assert f"job_{job_id}" not in stream.read()
    fields = cluster.wait_job(job_id, timeout=600)
    with open(out.replace("%j", job_id)) as stream:
        assert (fields.get("ExitCode"), stream.read()) == ("0:0", "small done\n")
