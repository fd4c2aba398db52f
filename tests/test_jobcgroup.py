"""blahvm.jobcgroup: reading a process's cgroups, where to move another into them, and the moving itself.

Parsing is tested on the text of this machine's files and of a cgroup v2 host; ``join`` on directories
standing in for cgroups (a plain file takes each write as the kernel's ``tasks`` would, one id per
write). cgroup v2 is covered here only: the real batch system in tests/test_slurm_cgroup.py runs v1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blahvm import jobcgroup
from blahvm.batch.slurm import placeholder_in
from blahvm.hypervisor.process import cpu_seconds_in, is_vcpu_thread, names_guest
from blahvm.jobcgroup import CgroupError, Membership, Mount, Target
from blahvm.lifecycle.charge import QEMU_OVERHEAD, limit_problem, memory_needed

MiB = 1024 * 1024

V1_CGROUP = """9:name=systemd:/
8:pids:/
6:freezer:/slurm_node1/uid_65534/job_7/step_extern
4:memory:/slurm_node1/uid_65534/job_7/step_extern/task_0
3:cpuset:/slurm_node1/uid_65534/job_7/step_extern
2:cpuacct:/slurm_node1/uid_65534/job_7/step_extern/task_0
1:cpu:/
5:devices:/slurm_node1/uid_65534/job_7/step_extern
0::/
"""
V1_MOUNTS = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_CGROUP = "0::/system.slice/slurmstepd.scope/job_7/step_extern/user/task_0\n"
V2_MOUNTS = "25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_a_v1_job_cgroup_is_joined_in_the_controllers_slurm_uses_memory_first_freezer_last_never_devices():
    places = jobcgroup.targets(jobcgroup.parse_cgroup(V1_CGROUP), jobcgroup.parse_mountinfo(V1_MOUNTS))
    base = "slurm_node1/uid_65534/job_7/step_extern"
    assert places == (
        Target(f"/sys/fs/cgroup/memory/{base}/task_0", "tasks", ("memory",)),
        Target(f"/sys/fs/cgroup/cpuacct/{base}/task_0", "tasks", ("cpuacct",)),
        Target(f"/sys/fs/cgroup/cpuset/{base}", "tasks", ("cpuset",)),
        Target(f"/sys/fs/cgroup/freezer/{base}", "tasks", ("freezer",)),
    )
    assert all(place.per_thread for place in places)


def test_a_v2_job_cgroup_is_one_place_the_whole_process_moves_to():
    places = jobcgroup.targets(jobcgroup.parse_cgroup(V2_CGROUP), jobcgroup.parse_mountinfo(V2_MOUNTS))
    assert places == (Target("/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/step_extern/user/task_0",
                             "cgroup.procs", ()),)
    assert not places[0].per_thread


def test_comounted_controllers_a_subtree_mount_and_escaped_mount_points():
    mounts = jobcgroup.parse_mountinfo(
        "1 0 0:1 /inner /mnt/cg\\040x rw - cgroup cgroup rw,cpu,cpuacct\n"
        "2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert mounts[0] == Mount(1, ("cpu", "cpuacct"), "/inner", "/mnt/cg x")
    members = (Membership(3, ("cpu", "cpuacct"), "/inner/job_1"), Membership(4, ("memory",), "/job_1"))
    assert jobcgroup.targets(members, mounts) == (
        Target("/sys/fs/cgroup/memory/job_1", "tasks", ("memory",)),
        Target("/mnt/cg x/job_1", "tasks", ("cpu", "cpuacct")),
    )
    with pytest.raises(CgroupError, match="not mounted here"):  # outside the mounted subtree
        jobcgroup.targets((Membership(3, ("cpu", "cpuacct"), "/other/job_1"),), mounts)
    # root cgroups are skipped unless asked for (leaving a job's cgroups for init's)
    assert jobcgroup.targets((Membership(4, ("memory",), "/"),), mounts) == ()
    assert jobcgroup.targets((Membership(4, ("memory",), "/"),), mounts, roots=True) == (
        Target("/sys/fs/cgroup/memory/", "tasks", ("memory",)),)


@pytest.mark.parametrize("line", ["garbage", "x:cpu:/a", "1:cpu:relative"])
def test_a_malformed_cgroup_line_is_one_clear_error(line):
    with pytest.raises(CgroupError, match="not a /proc/PID/cgroup line"):
        jobcgroup.parse_cgroup(line)


def test_the_tightest_memory_limit_up_the_tree_and_none_for_unlimited():
    assert jobcgroup.tightest_limit(["9223372036854771712\n", "1048576000\n", "2097152000\n"]) == 1048576000
    assert jobcgroup.tightest_limit(["max\n", "536870912\n"]) == 536870912
    assert jobcgroup.tightest_limit(["max\n", "9223372036854771712", None]) is None


def test_memory_limit_reads_the_cgroup_and_its_ancestors(tmp_path):
    job = tmp_path / "memory" / "job_7" / "step_extern"
    job.mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "job_7" / "memory.limit_in_bytes").write_text(f"{300 * MiB}\n")
    (job / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    mounts = (Mount(1, ("memory",), "/", str(tmp_path / "memory")),)
    places = (Target(str(job), "tasks", ("memory",)),)
    assert jobcgroup.memory_limit(places, mounts) == 300 * MiB
    assert jobcgroup.memory_limit((Target(str(job), "tasks", ("freezer",)),), mounts) is None


def test_a_limit_below_the_guest_and_qemus_overhead_is_refused_with_the_rule():
    guest = 256 * MiB
    assert memory_needed(guest) == guest + int(QEMU_OVERHEAD)
    assert limit_problem(None, guest) is None and limit_problem(memory_needed(guest), guest) is None
    problem = limit_problem(300 * MiB, guest)
    assert "below its guest's 256MiB plus 128MiB for QEMU (384MiB)" in problem and "\n" not in problem


def test_join_writes_every_thread_one_per_write_memory_charge_first(tmp_path):
    """A process with several threads: each tid reaches ``tasks`` in a write of its own, the leader first."""
    memory, freezer, unified = (tmp_path / name for name in ("memory", "freezer", "unified"))
    for directory in (memory, freezer, unified):
        directory.mkdir()
        for name in ("tasks", "cgroup.procs", "memory.move_charge_at_immigrate"):
            (directory / name).write_text("")
    code = "import threading, sys; e = threading.Event(); [threading.Thread(target=e.wait).start() for _ in range(3)]; " \
           "print('ready', flush=True); sys.stdin.read(); e.set()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        tids = jobcgroup.threads_of(child.pid)
        assert len(tids) == 4
        jobcgroup.join(child.pid, (Target(str(memory), "tasks", ("memory",)), Target(str(freezer), "tasks", ("freezer",)),
                                   Target(str(unified), "cgroup.procs", ())))
    finally:
        child.stdin.close()
        child.wait(30)
    # one open per cgroup, one write per id: a plain file holds them in the order written
    written = (memory / "tasks").read_text()
    assert written == "".join(str(tid) for tid in [child.pid] + [t for t in tids if t != child.pid])
    assert (freezer / "tasks").read_text() == written
    assert (memory / "memory.move_charge_at_immigrate").read_text() == "3"
    assert (freezer / "memory.move_charge_at_immigrate").read_text() == ""
    assert (unified / "cgroup.procs").read_text() == str(child.pid)  # v2: the process, whole


def test_join_never_follows_a_symlink_and_names_the_cgroup_that_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "secret").write_text("")
    place = tmp_path / "cg"
    place.mkdir()
    os.symlink(real / "secret", place / "tasks")
    with pytest.raises(CgroupError, match=f"cgroup {place}/tasks"):
        jobcgroup.join(os.getpid(), (Target(str(place), "tasks", ("freezer",)),))
    assert (real / "secret").read_text() == ""
    with pytest.raises(CgroupError, match="missing"):
        jobcgroup.join(os.getpid(), (Target(str(tmp_path / "missing"), "tasks", ("freezer",)),))


def test_frozen_is_read_from_v1_freezer_state_and_v2_cgroup_events():
    assert jobcgroup.frozen_state("FROZEN\n", "freezer.state") and jobcgroup.frozen_state("FREEZING", "freezer.state")
    assert not jobcgroup.frozen_state("THAWED\n", "freezer.state")
    assert jobcgroup.frozen_state("populated 1\nfrozen 1\n", "cgroup.events")
    assert not jobcgroup.frozen_state("populated 1\nfrozen 0\n", "cgroup.events")
    assert not jobcgroup.frozen(os.getpid())  # this test is not in a frozen cgroup


def test_this_process_cgroups_parse_and_resolve():
    memberships = jobcgroup.memberships_of(os.getpid())
    assert memberships and all(member.path.startswith("/") for member in memberships)
    jobcgroup.targets(memberships, jobcgroup.mounts_here())  # every hierarchy it is in is mounted here


def test_qemus_pid_is_trusted_only_for_a_command_line_naming_the_guest():
    line = b"/usr/bin/qemu-system-x86_64\0-name\0guest=blahvm-7_node1-ab12cd34,debug-threads=on\0-S\0"
    assert names_guest(line, "blahvm-7_node1-ab12cd34")
    assert not names_guest(line, "blahvm-7_node1-ab12cd3")
    assert not names_guest(b"/bin/sleep\0100\0", "blahvm-7_node1-ab12cd34")
    assert is_vcpu_thread(b"CPU 0/TCG") and is_vcpu_thread(b"CPU 12/KVM")
    assert not is_vcpu_thread(b"qemu-system-x86") and not is_vcpu_thread(b"CPU x/KVM") and not is_vcpu_thread(b"CPU 0")


def test_a_process_cpu_time_is_user_plus_system_of_its_stat_line():
    stat = b"42 (qemu system) S 1 42 42 0 -1 4194560 1 0 0 0 250 125 0 0 20 0 4 0 100 0 0"
    assert cpu_seconds_in(stat, 100) == pytest.approx(3.75)


def test_the_extern_steps_placeholder_is_slurmstepds_one_live_sleep_child():
    stats = [b"100 (slurmstepd) S 1 100 100 0 -1 0",
             b"101 (sleep) S 100 101 101 0 -1 0",
             b"102 (slurmstepd) S 100 102 102 0 -1 0",  # the hook's own parent, forked by the plugin
             b"103 (sleep) Z 100 103 103 0 -1 0",
             b"104 (sleep) S 55 104 104 0 -1 0"]
    assert placeholder_in(stats, 100) == 101
    assert placeholder_in(stats + [b"105 (sleep) S 100 105 105 0 -1 0"], 100) is None  # not one: none
    assert placeholder_in([b"garbage"], 100) is None


def test_charge_leaves_alone_a_job_without_a_running_guest_or_without_a_qemu_here(tmp_path, golden, keep_driver):
    """Before any move: no running guest is the job's fault; a guest libvirt runs without a local QEMU
    (the test driver, Xen) cannot be charged, and the reference's root cgroups are no job's."""
    from blahvm.lifecycle import prepare, teardown
    from blahvm.lifecycle.charge import charge
    from blahvm.model import Outcome
    from tests.test_lifecycle import make_config, make_job

    config = make_config(tmp_path, golden)
    job = make_job()
    none = charge(config, job.job_id, os.getpid())
    assert (none.outcome, none.charged) == (Outcome.FAIL_JOB, False) and "no running guest" in none.message
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    try:
        init = charge(config, job.job_id, 1)  # init is in no job's cgroups
        assert init.outcome is Outcome.OK and not init.charged and "in no cgroup of a job" in init.message
    finally:
        assert teardown(config, job.job_id).outcome is Outcome.OK


def test_a_hook_leaves_only_the_cgroups_of_its_job_for_inits():
    mine = jobcgroup.parse_cgroup(V1_CGROUP)
    init = jobcgroup.parse_cgroup(V1_CGROUP.replace("/slurm_node1/uid_65534/job_7/step_extern/task_0", "/")
                                  .replace("/slurm_node1/uid_65534/job_7/step_extern", "/"))
    assert [(m.controllers, m.path) for m in jobcgroup.leaving(mine, init, "job_7")] == [
        (("freezer",), "/"), (("memory",), "/"), (("cpuset",), "/"), (("cpuacct",), "/"), (("devices",), "/")]
    assert jobcgroup.leaving(mine, init, "job_70") == ()  # another job's name is not a prefix match
    v2 = jobcgroup.parse_cgroup(V2_CGROUP)
    assert jobcgroup.leaving(v2, jobcgroup.parse_cgroup("0::/init.scope\n"), "job_7") == (Membership(0, (), "/init.scope"),)
