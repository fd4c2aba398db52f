"""The PBS plugin on a real OpenPBS 23.06 (tests/openpbs_cluster.py) and real guests, set up as docs/pbs.md
says for OpenPBS: ``blahvm install pbs --openpbs`` and the qmgr commands it prints, run as printed (one
hook, no classic prologue or epilogue), a routing queue ``grid`` and an execution queue ``short``. Jobs
are submitted with qsub as a normal user whose home (OpenPBS's job directory) is not theirs: nothing is
shared with the guest (the daemons' mount namespace is not libvirt's, see tests/openpbs_cluster.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from tests.openpbs_cluster import HOME, PREFIX, OpenPBS, available, job_user
from tests.real_batch import guests_of_pool, remove_pool_and_its_guests, remove_run_dirs, settle_templates, virsh

pytestmark = pytest.mark.guest

SYSTEM_PYTHON = "/usr/bin/python3"  # OpenPBS hooks run on it; the job starter runs as every job's user
BOOT_ID = "/proc/sys/kernel/random/boot_id"
OTHER_MEMORY_MIB = 384  # environment "other": the demo image with more memory than "vm" (256 MiB), 2 vcpus


@pytest.fixture(scope="module")
def openpbs(demo_image, request):
    why = available()
    if why:
        pytest.skip(why)
    # one run of this module at a time on the host's one OpenPBS: another run's fixture would install its
    # own site's hook and stop the daemons at its end (seen when two ran at once)
    lock = open("/run/blahvm-test-openpbs.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    request.addfinalizer(lock.close)
    from blahvm.hypervisor.kvm import resolve_domain_type

    user = job_user()
    directory = tempfile.mkdtemp(prefix="blahvm-test-openpbs-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-test-openpbs-{os.getpid()}"
    vm = yaml.safe_load(demo_image.environment_yaml("vm"))["vm"]
    config = {
        "hypervisor": {"uri": "qemu:///system", "pool": pool, "pool_path": f"{directory}/clones",
                       "domain_type": resolve_domain_type("auto")},
        "host": {"max_guests": 2, "memory": "4GiB", "vcpus": 2, "state_dir": f"{directory}/state",
                 "run_dir": f"/run/blahvm-openpbs-{os.getpid()}", "log_file": f"{directory}/blahvm.log"},
        "defaults": {"walltime": "1h", "cores": 1},
        "vo_mapping": [{"user": f"^(?P<vo>{user.pw_name})$"}],
        "environments": {"vm": vm, "other": dict(vm, memory=f"{OTHER_MEMORY_MIB}MiB", vcpus=2)},
        "queues": {"grid": {}, "short": {"max_walltime": "10h"}},
        "routes": [
            {"name": "other-env", "when": {"queue": "grid", "vo": user.pw_name, "environment": "other"},
             "queue": "short", "environment": "other"},
            {"name": "vm-short", "when": {"queue": "grid", "vo": user.pw_name, "walltime": "<= 10h"},
             "queue": "short", "environment": "vm"},
            {"name": "nobody-else", "reject": "no execution environment is offered to this VO"},
        ],
    }
    os.makedirs(f"{directory}/state", mode=0o755)
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    os.chmod(path, 0o644)
    work = os.path.join(directory, "work")  # the job's output files: the user's
    os.mkdir(work)
    os.chown(work, user.pw_uid, user.pw_gid)
    cluster = OpenPBS()
    sched_config = f"{HOME}/sched_priv/sched_config"
    with open(sched_config, "rb") as stream:
        scheduler_was = stream.read()
    try:
        cluster.up()
        leftover = cluster.run([f"{PREFIX}/bin/qselect"]).stdout.split()  # jobs an interrupted run left
        if leftover:
            cluster.run([f"{PREFIX}/bin/qdel", "-W", "force", *leftover])
        cluster.driver("install-classic", "--remove")
        if cluster.qmgr("list hook blahvm", check=False).returncode == 0:
            cluster.driver("remove-hook", "blahvm")
        installed = subprocess.run(
            [sys.executable, "-m", "blahvm.cli.main", "install", "pbs", "--openpbs", "--home", HOME, "--config", path,
             "--python", SYSTEM_PYTHON], capture_output=True, text=True, timeout=120)
        assert installed.returncode == 0, installed.stderr
        assert not os.path.exists(f"{HOME}/mom_priv/prologue") and "$job_starter" not in installed.stdout
        for line in installed.stdout.splitlines():  # the printed commands, as an admin runs them
            if line.startswith('qmgr -c "'):
                command = line[len('qmgr -c "'):-1]
                done = cluster.qmgr(command, check=False)
                assert done.returncode == 0 or "Duplicate" in done.stderr + done.stdout, (command, done)
            elif line.startswith(("sed -i ", "kill -HUP ")):
                done = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (line, done)
        with open(sched_config) as stream:
            assert any(line.startswith("resources: ") and line.rstrip().endswith(', blahvm_slots"')
                       for line in stream)
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{HOME}/mom_priv/hooks/blahvm.PY"):
            assert time.monotonic() < deadline, "the mom never got the hook"
            time.sleep(0.5)
        for queue in ("grid", "short"):
            if cluster.qmgr(f"list queue {queue}", check=False).returncode != 0:
                cluster.qmgr(f"create queue {queue} queue_type=execution")
            cluster.qmgr(f"set queue {queue} enabled = true")
            cluster.qmgr(f"set queue {queue} started = true")
        deadline = time.monotonic() + 150  # exechost_periodic (freq 60) publishes the slots
        while cluster.slots() != 2:
            assert time.monotonic() < deadline, f"blahvm_slots never published: {cluster.slots()}"
            time.sleep(1)
        cluster.site = {"config": path, "dir": directory, "work": work, "pool": pool, "user": user,
                        "run_dir": config["host"]["run_dir"]}
        yield cluster
    finally:
        if cluster.qmgr("list hook blahvm", check=False).returncode == 0:
            cluster.driver("remove-hook", "blahvm", check=False)
        cluster.qmgr("unset server restrict_res_to_release_on_suspend", check=False)
        with open(sched_config, "wb") as stream:
            stream.write(scheduler_was)
        cluster.driver("down", check=False)
        remove_pool_and_its_guests(pool)
        shutil.rmtree(directory, ignore_errors=True)
        remove_run_dirs(config["host"]["run_dir"])


def _log(pbs) -> str:
    try:
        with open(os.path.join(pbs.site["dir"], "blahvm.log")) as stream:
            text = stream.read()[-3000:]
    except OSError:
        text = "(no blahvm log)"
    return text + "\n--- mom log ---\n" + pbs.mom_log()[-3000:]


def _live(pbs):
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    with Ledger(load_config(pbs.site["config"]).host) as ledger:
        return [entry.job_id for entry in ledger.live()]


def _nothing_left(pbs):
    site = pbs.site
    settle_templates(site["config"])
    volumes = virsh("vol-list", site["pool"]).stdout
    assert ".qcow2" not in volumes, volumes
    assert not os.path.isdir(site["run_dir"]) or os.listdir(site["run_dir"]) == []
    assert _live(pbs) == [], _log(pbs)
    assert guests_of_pool(site["pool"]) == []


def _submit(pbs, name, args, input=None):
    """qsub -q grid -N NAME, output into the user's directory as NAME.out and NAME.err."""
    work = pbs.site["work"]
    submitted = pbs.qsub(["-q", "grid", "-N", name, "-o", f"{work}/{name}.out", "-e", f"{work}/{name}.err", *args],
                         cwd=work, input=input)
    assert submitted.returncode == 0, (submitted.stdout, submitted.stderr)
    return submitted.stdout.strip()


def _read(path: str) -> str:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.3)
    with open(path, errors="replace") as stream:
        return stream.read()


def _host_boot_id() -> str:
    with open(BOOT_ID) as stream:
        return stream.read().strip()


def _finished(pbs, job_id, timeout=300):
    """The job's attributes once it is finished and purged; it ran exactly once (never requeued)."""
    fields = pbs.wait(job_id, timeout=timeout)
    assert fields.get("run_count") in (None, 1), (fields, _log(pbs))
    return fields


def test_command_job_runs_in_a_guest_with_its_output_and_exit_code(openpbs):
    job_id = _submit(openpbs, "cmd", ["--", "/bin/sh", "-c", f"cat {BOOT_ID}; id -u; echo to-stderr >&2; exit 3"])
    fields = _finished(openpbs, job_id)
    assert fields["queue"] == "short" and fields["Exit_status"] == 3, (fields, _log(openpbs))
    boot_id, uid = _read(f"{openpbs.site['work']}/cmd.out").split()
    assert boot_id != _host_boot_id() and uid == str(openpbs.site["user"].pw_uid)
    assert _read(f"{openpbs.site['work']}/cmd.err") == "to-stderr\n"
    _nothing_left(openpbs)


def test_script_job_runs_in_a_guest(openpbs):
    """The mom writes the script's path on the shell's stdin; the starter feeds the guest the script."""
    script = f"#!/bin/sh\necho script in $(cat {BOOT_ID})\necho to-stderr >&2\nexit 5\n"
    job_id = _submit(openpbs, "script", [], input=script)
    fields = _finished(openpbs, job_id)
    assert fields["queue"] == "short" and fields["Exit_status"] == 5, (fields, _log(openpbs))
    said, boot_id = _read(f"{openpbs.site['work']}/script.out").rsplit(" ", 1)
    assert said == "script in" and boot_id.strip() != _host_boot_id()
    assert _read(f"{openpbs.site['work']}/script.err") == "to-stderr\n"
    _nothing_left(openpbs)


def test_rejection_at_qsub_with_its_reason(openpbs):
    rejected = openpbs.qsub(["-q", "grid", "--", "/bin/true"], user="daemon", cwd="/tmp")
    assert rejected.returncode != 0 and rejected.stdout == ""
    assert "no execution environment is offered to this VO" in rejected.stderr, rejected.stderr


def test_the_environment_asked_for_is_the_guests(openpbs):
    """blahvm_env needs flag=m: without it the mom never sees it and the job gets another environment."""
    meminfo = "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"
    asked = _submit(openpbs, "env", ["-l", "blahvm_env=other", "--", "/bin/sh", "-c", meminfo])
    default = _submit(openpbs, "noenv", ["--", "/bin/sh", "-c", meminfo])
    fields = _finished(openpbs, asked)
    assert fields["Exit_status"] == 0 and fields["Resource_List"]["blahvm_env"] == "other", (fields, _log(openpbs))
    assert _finished(openpbs, default)["Resource_List"]["blahvm_env"] == "vm"
    other = int(_read(f"{openpbs.site['work']}/env.out"))
    vm = int(_read(f"{openpbs.site['work']}/noenv.out"))
    assert 256 * 1024 < other <= OTHER_MEMORY_MIB * 1024 and vm <= 256 * 1024, (other, vm)
    _nothing_left(openpbs)


def test_qsub_still_routes_after_a_resource_is_created(openpbs):
    """qmgr create resource restarts pbs_server's Python: the hook must import again (no C extension twice)."""
    name = f"blahvm_test_{os.getpid()}"
    openpbs.qmgr(f"create resource {name} type=long")
    try:
        job_id = _submit(openpbs, "after", ["--", "/bin/sh", "-c", "exit 6"])
        fields = _finished(openpbs, job_id)
        assert fields["queue"] == "short" and fields["Exit_status"] == 6, (fields, _log(openpbs))
    finally:
        openpbs.qmgr(f"delete resource {name}", check=False)
    _nothing_left(openpbs)


def test_qdel_of_a_running_job_leaves_nothing(openpbs):
    job_id = _submit(openpbs, "killed", ["--", "/bin/sh", "-c", "echo started; sleep 600"])
    deadline = time.monotonic() + 120
    while not (openpbs.job(job_id).get("job_state") == "R" and _live(openpbs)
               and os.path.exists(f"{HOME}/spool/{job_id}.OU")
               and os.path.getsize(f"{HOME}/spool/{job_id}.OU") > 0):
        assert time.monotonic() < deadline, (openpbs.job(job_id), _log(openpbs))
        time.sleep(0.5)
    deleted = openpbs.run([f"{PREFIX}/bin/qdel", job_id], user=openpbs.site["user"].pw_name)
    assert deleted.returncode == 0, deleted.stderr
    fields = openpbs.wait(job_id, timeout=120)
    # the mom's SIGTERM reaches the payload in the guest through the starter: 128 + 15, the starter's exit
    assert fields["Exit_status"] == 143, (fields, _log(openpbs))
    assert _read(f"{openpbs.site['work']}/killed.out") == "started\n"
    _nothing_left(openpbs)


def test_four_jobs_on_two_slots_all_run_two_guests_at_once(openpbs):
    """queuejob adds blahvm_slots=1 to each job's select and exechost_periodic publishes the slots PBS may
    use (free plus held): PBS runs two at a time, each once, the others when a slot is back."""
    ids = [_submit(openpbs, f"slot{n}", ["--", "/bin/sh", "-c", "sleep 15"]) for n in range(4)]
    assert all("blahvm_slots=1" in openpbs.job(job_id)["Resource_List"]["select"] for job_id in ids)
    most = 0
    deadline = time.monotonic() + 600
    while not all(openpbs.job(job_id).get("job_state") == "F" for job_id in ids):
        assert time.monotonic() < deadline, [openpbs.job(job_id).get("job_state") for job_id in ids]
        most = max(most, len(_live(openpbs)))
        time.sleep(0.5)
    assert [_finished(openpbs, job_id)["Exit_status"] for job_id in ids] == [0, 0, 0, 0], _log(openpbs)
    assert most == 2, _log(openpbs)
    _nothing_left(openpbs)



BURN_TICKS = 500  # the guest's own CPU time its payload burns, in clock ticks (USER_HZ, 100 a second)
BURN = f"""#!/bin/sh
echo started
t=0
while [ "$t" -lt {BURN_TICKS} ]; do
  i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done
  read -r line < /proc/$$/stat
  set -- ${{line#*) }}
  t=$(( ${{12}} + ${{13}} ))
done
echo "$t" >&2
echo burned
exit 7
"""


def _guest_of(pbs, job_id):
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    with Ledger(load_config(pbs.site["config"]).host) as ledger:
        entry = ledger.get(job_id)
    return None if entry is None or not entry.live else entry.guest


def _qsig(pbs, signal, job_id):
    done = pbs.run([f"{PREFIX}/bin/qsig", "-s", signal, job_id])
    assert done.returncode == 0, (done.stdout, done.stderr, _log(pbs))


def _domstate_becomes(guest, state, pbs, job_id):
    deadline = time.monotonic() + 90
    while virsh("domstate", guest).stdout.strip() != state:
        assert time.monotonic() < deadline, (state, virsh("domstate", guest).stdout, pbs.job(job_id), _log(pbs))
        time.sleep(0.2)


def test_guest_cpu_is_the_jobs_and_qsig_suspend_pauses_the_guest(openpbs):
    """A script job burns 5 CPU-seconds in its guest (measured there) and is suspended meanwhile:
    execjob_postsuspend pauses the guest (its vcpus' time stands still), execjob_preresume resumes it;
    the job ends with its exact output and exit code, and execjob_epilogue charged the guest's CPU time,
    memory and run less its suspension to resources_used (the mom alone measures the starter's tenths of
    a second)."""
    from blahvm.config import load_config
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.stats import domain_usage
    from blahvm.lifecycle import accounting

    job_id = _submit(openpbs, "burn", [], input=BURN)
    spool = f"{HOME}/spool/{job_id}.OU"
    deadline = time.monotonic() + 180
    while not (os.path.exists(spool) and os.path.getsize(spool) > 0):
        assert time.monotonic() < deadline, (openpbs.job(job_id), _log(openpbs))
        time.sleep(0.2)
    guest = _guest_of(openpbs, job_id)
    _qsig(openpbs, "suspend", job_id)
    _domstate_becomes(guest, "paused", openpbs, job_id)
    config = load_config(openpbs.site["config"])
    with open_connection(config.hypervisor.uri, timeout=30) as conn:
        assert openpbs.job(job_id)["job_state"] == "S"
        # restrict_res_to_release_on_suspend = ncpus (printed by install): the paused guest keeps its slot
        assert _assigned(openpbs) == {"blahvm_slots": 1, "ncpus": 0}, _assigned(openpbs)
        before = domain_usage(conn, guest).vcpu_seconds
        time.sleep(4)
        assert domain_usage(conn, guest).vcpu_seconds == pytest.approx(before, abs=0.05)
    _qsig(openpbs, "resume", job_id)
    _domstate_becomes(guest, "running", openpbs, job_id)
    fields = _finished(openpbs, job_id)
    assert fields["Exit_status"] == 7, (fields, _log(openpbs))
    assert _read(f"{openpbs.site['work']}/burn.out") == "started\nburned\n"
    assert int(_read(f"{openpbs.site['work']}/burn.err")) >= BURN_TICKS
    runs = accounting(config, job_id=job_id).records
    assert len(runs) == 1 and runs[0].cpu_seconds is not None, runs
    used = fields["resources_used"]
    cput = pbs_seconds(used["cput"])
    assert cput >= runs[0].cpu_seconds and cput >= BURN_TICKS / 100 * 0.6, (used, runs, _log(openpbs))
    assert pbs_kb(used["mem"]) * 1024 >= runs[0].max_memory_bytes, (used, runs)
    # walltime: never more than the guest's whole run, its 4 s or more paused included. The hook
    # subtracts the pause from the guest's run (test_pbs.py checks the rule) but keeps the mom's own
    # figure when larger, and the mom stops and starts its clock at its polls, seconds apart under load:
    # how much of the pause shows depends on them (seen: 7 s of a 9.7 s run with 4 s paused).
    assert 1 <= pbs_seconds(used["walltime"]) <= runs[0].wall_seconds, (used, runs, _log(openpbs))
    _nothing_left(openpbs)


def _assigned(pbs) -> dict:
    """``resources_assigned`` blahvm_slots and ncpus of this host's vnode, as the server has them."""
    from tests.openpbs_cluster import qstat_json

    done = pbs.run([f"{PREFIX}/bin/pbsnodes", "-a", "-F", "json"])
    assigned = next(iter(json.loads(qstat_json(done.stdout))["nodes"].values())).get("resources_assigned", {})
    return {name: int(assigned.get(name, 0)) for name in ("blahvm_slots", "ncpus")}


def pbs_seconds(text) -> int:
    from blahvm.batch.pbs import parse_pbs_duration

    return int(parse_pbs_duration(str(text)))


def pbs_kb(text) -> int:
    from blahvm.batch.pbs import parse_pbs_size

    return int(parse_pbs_size(str(text))) // 1024


def test_two_chunks_on_one_host_run_in_one_guest_with_both_cores(openpbs):
    """select=2:ncpus=1: queuejob packs the chunks on one host (place=pack) and the guest gets both cores."""
    job_id = _submit(openpbs, "chunks", ["-l", "select=2:ncpus=1", "-l", "blahvm_env=other", "--", "/bin/sh", "-c",
                                         "grep -c ^processor /proc/cpuinfo; exit 4"])
    fields = _finished(openpbs, job_id)
    assert fields["Exit_status"] == 4, (fields, _log(openpbs))
    assert fields["Resource_List"]["place"].startswith("pack"), fields["Resource_List"]
    assert _read(f"{openpbs.site['work']}/chunks.out") == "2\n"
    _nothing_left(openpbs)


def test_what_one_guest_cannot_run_is_refused_at_qsub_with_the_reason(openpbs):
    for args, reason in ((["-W", "sandbox=PRIVATE"], "sandbox=PRIVATE is not supported"),
                         (["-l", "select=2:ncpus=1", "-l", "place=scatter"], "a job runs in one guest on one host")):
        refused = openpbs.qsub(["-q", "grid", *args, "--", "/bin/true"], cwd="/tmp")
        assert refused.returncode != 0 and refused.stdout == "", (args, refused.stdout)
        assert reason in refused.stderr, (args, refused.stderr)


def test_a_permanent_refusal_at_start_ends_the_job_once_with_its_reason(openpbs):
    """A job altered after queuejob (qalter -W sandbox=PRIVATE while held) is refused at execjob_begin:
    the hook deletes it (job.delete(), reject): one attempt, no requeue, no hold."""
    job_id = _submit(openpbs, "altered", ["-h", "--", "/bin/sh", "-c", "echo ran; exit 0"])
    altered = openpbs.run([f"{PREFIX}/bin/qalter", "-W", "sandbox=PRIVATE", job_id], user=openpbs.site["user"].pw_name)
    assert altered.returncode == 0, (altered.stdout, altered.stderr)
    released = openpbs.run([f"{PREFIX}/bin/qrls", job_id], user=openpbs.site["user"].pw_name)
    assert released.returncode == 0, (released.stdout, released.stderr)
    fields = openpbs.wait(job_id, timeout=180)
    assert fields["job_state"] == "F" and fields.get("Hold_Types", "n") == "n", (fields, _log(openpbs))
    assert fields["run_count"] == 1 and fields["Exit_status"] == -19, fields  # JOB_EXEC_HOOK_DELETE: deleted
    assert not os.path.exists(f"{openpbs.site['work']}/altered.out")  # it never ran
    traced = openpbs.run([f"{PREFIX}/bin/tracejob", "-n", "2", job_id])  # where OpenPBS keeps the reason
    assert "sandbox=PRIVATE is not supported" in traced.stdout, (traced.stdout, traced.stderr)
    _nothing_left(openpbs)


def test_a_job_the_rules_refuse_at_start_ends_once_with_the_reason_on_its_stderr(openpbs):
    """A job altered after queuejob (qalter -l walltime beyond every route) is refused by the rules at
    execjob_begin: it is not requeued nor held; it ends at once with the reason in its .e file."""
    user = openpbs.site["user"].pw_name
    job_id = _submit(openpbs, "refused", ["-h", "--", "/bin/sh", "-c", "echo ran; exit 0"])
    for command in (["qalter", "-l", "walltime=20:00:00", job_id], ["qrls", job_id]):
        done = openpbs.run([f"{PREFIX}/bin/{command[0]}", *command[1:]], user=user)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    fields = _finished(openpbs, job_id, timeout=180)
    assert fields["Exit_status"] == 255 and fields.get("Hold_Types", "n") == "n", (fields, _log(openpbs))
    assert _read(f"{openpbs.site['work']}/refused.out") == ""
    assert _read(f"{openpbs.site['work']}/refused.err") == (
        f"blahvm: job {job_id}: rejected on this host: no route puts this job in queue short: "
        "no execution environment is offered to this VO\n")
    _nothing_left(openpbs)


def test_a_refusal_for_want_of_a_hypervisor_backs_off_instead_of_a_retry_storm(openpbs):
    """execjob_begin cannot reach the hypervisor (RETRY_ELSEWHERE): the job is requeued and the host's
    blahvm_slots withdrawn, so OpenPBS does not send it again at once (21 times, then a hold) but waits;
    once the hypervisor is back exechost_periodic publishes the slots and the job runs."""
    path = openpbs.site["config"]
    with open(path) as stream:
        original = stream.read()
    broken = yaml.safe_load(original)
    broken["hypervisor"]["uri"] = "qemu+unix:///system?socket=/run/blahvm-test-no-such-libvirt-sock"

    def write(text):
        with open(path + ".new", "w") as stream:
            stream.write(text)
        os.chmod(path + ".new", 0o644)
        os.replace(path + ".new", path)

    write(yaml.safe_dump(broken))
    try:
        job_id = _submit(openpbs, "backoff", ["--", "/bin/sh", "-c", "echo ran; exit 2"])
        deadline = time.monotonic() + 120
        while not (openpbs.slots() == 0 and int(openpbs.job(job_id).get("run_count", 0)) >= 1):
            assert time.monotonic() < deadline, (openpbs.slots(), openpbs.job(job_id), _log(openpbs))
            time.sleep(0.5)
        time.sleep(5)  # a retry storm would be well under way by now: 21 attempts took about 6 s
        fields = openpbs.job(job_id)
        assert fields["job_state"] == "Q" and fields.get("Hold_Types", "n") == "n", (fields, _log(openpbs))
        assert int(fields["run_count"]) <= 3, (fields, _log(openpbs))
    finally:
        write(original)
    deadline = time.monotonic() + 150  # the next exechost_periodic (freq 60) counts the slots again
    while openpbs.slots() != 2:
        assert time.monotonic() < deadline, (openpbs.slots(), _log(openpbs))
        time.sleep(1)
    openpbs.qmgr("set server scheduling = true")  # a scheduling cycle now, not at the next 600 s one
    fields = openpbs.wait(job_id, timeout=300)
    assert fields["Exit_status"] == 2 and fields.get("Hold_Types", "n") == "n", (fields, _log(openpbs))
    assert _read(f"{openpbs.site['work']}/backoff.out") == "ran\n"
    _nothing_left(openpbs)
