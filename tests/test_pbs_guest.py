"""One whole PBS job through a real guest for each flow: Torque-style (prologue with 7 arguments,
``$job_starter``, epilogue) and OpenPBS-style (execjob_begin, execjob_launch with the mom's argv
rebuild, execjob_end through the hook). Two boots in all."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from blahvm.config import load_config
from blahvm.lifecycle import accounting, capacity, reap
from tests import pbs_harness

pytestmark = pytest.mark.guest

SITE = """\
hypervisor: {{uri: "qemu:///system", pool: {pool}, pool_path: {where}/clones, domain_type: qemu, timeout: 60}}
host: {{max_guests: 2, state_dir: {where}/state, run_dir: {where}/run}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{user: "^(?P<vo>nobody)$"}}
environments:
{environment}
queues:
  grid: {{}}
  short: {{max_walltime: 10h}}
routes:
  - {{name: nobody-short, when: {{queue: grid, vo: nobody}}, queue: short, environment: demo}}
"""
SCRIPT = "echo in the guest as $(id -u)\necho to-stderr >&2\nexit 3\n"


@pytest.fixture(scope="module")
def pbs_site(demo_image):
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    where = tempfile.mkdtemp(prefix="blahvm-test-pbs-", dir="/var/tmp")
    os.chmod(where, 0o755)  # QEMU's user and the job's user reach what is below
    pool = f"blahvm-test-pbs-{uuid.uuid4().hex[:8]}"
    environment = textwrap.indent(demo_image.environment_yaml("demo"), "  ")
    config = os.path.join(where, "site.yaml")
    with open(config, "w") as stream:
        stream.write(SITE.format(pool=pool, where=where, environment=environment))
    home = os.path.join(where, "pbs_home")
    os.makedirs(os.path.join(home, "mom_priv"), mode=0o755)
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "pbs", "--home", home, "--config",
                           config, "--python", pbs_harness.SYSTEM_PYTHON, "--qstat", "/bin/false"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    script = os.path.join(where, "job.sh")
    with open(script, "w") as stream:
        stream.write(SCRIPT)
    os.chmod(script, 0o644)
    try:
        yield where, home, config, script
    finally:
        site = load_config(config)
        reap(site)
        subprocess.run(["virsh", "-c", "qemu:///system", "pool-destroy", pool], capture_output=True)
        subprocess.run(["virsh", "-c", "qemu:///system", "pool-undefine", pool], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def job_environment(job_id, **extra):
    env = {"PBS_JOBID": job_id, "PBS_QUEUE": "short", "HOME": "/", "USER": "nobody", "LOGNAME": "nobody",
           "PATH": "/bin:/usr/bin"}
    env.update(extra)
    return env


def test_torque_job_runs_in_its_guest_from_prologue_to_epilogue(pbs_site):
    where, home, config, script = pbs_site
    mom_priv = os.path.join(home, "mom_priv")
    job_id = "101.torque"
    argv = [job_id, "nobody", "nogroup", "pbsjob", "walltime=00:10:00,nodes=1", "short", ""]
    before = capacity(load_config(config)).guests
    prologue = pbs_harness.run_script(os.path.join(mom_priv, "prologue"), argv, cwd=mom_priv)
    try:
        assert prologue == pbs_harness.Ran(0, b"", b""), prologue
        ran = pbs_harness.run_job_program(os.path.join(mom_priv, "blahvm_job_starter"),
                                          ["blahvm_job_starter", "/bin/sh"], job_environment(job_id), cwd="/",
                                          user="nobody", stdin_file=script)
        assert ran.code == 3, ran.stderr
        assert ran.stdout == b"in the guest as 65534\n" and b"to-stderr\n" in ran.stderr
    finally:
        epilogue = pbs_harness.run_script(
            os.path.join(mom_priv, "epilogue"),
            [job_id, "nobody", "nogroup", "pbsjob", "4242", "walltime=00:10:00,nodes=1", "walltime=00:00:09",
             "short", "", "3"], cwd="/")
    assert epilogue == pbs_harness.Ran(0, b"", b"")
    assert capacity(load_config(config)).guests == before


def test_openpbs_job_runs_in_its_guest_through_the_hook(pbs_site):
    where, home, config, script = pbs_site
    hook = os.path.join(home, "blahvm", "blahvm_hook.py")
    settings = os.path.join(home, "blahvm", "blahvm_hook.json")
    job_id = "102.vm"
    job = {"id": job_id, "queue": "short", "euser": "nobody", "egroup": "nogroup", "Job_Name": "STDIN",
           "Resource_List": {"ncpus": 1, "place": "free", "select": "1:ncpus=1", "walltime": "00:10:00"}}
    before = capacity(load_config(config)).guests
    begin = pbs_harness.run_hook(hook, {"type": "execjob_begin", "hook_config": settings, "job": job}, timeout=120)
    try:
        assert begin["verdict"] == "accept", begin
        env = job_environment(job_id)
        launch = pbs_harness.run_hook(hook, {"type": "execjob_launch", "hook_config": settings, "job": job,
                                             "progname": "/bin/sh", "argv": [], "env": env})
        assert launch["verdict"] == "accept", launch
        progname, argv = pbs_harness.mom_exec_argv(launch["progname"], launch["argv"], script_job=True)
        ran = pbs_harness.run_job_program(progname, argv, launch["env"], cwd="/", user="nobody", stdin_file=script)
        assert ran.code == 3, ran.stderr
        assert ran.stdout == b"in the guest as 65534\n" and b"to-stderr\n" in ran.stderr
    finally:
        used = dict(job, resources_used={"cput": "00:00:00", "mem": "1024kb", "walltime": "00:00:09"})
        epilogue = pbs_harness.run_hook(hook, {"type": "execjob_epilogue", "hook_config": settings, "job": used},
                                        timeout=120)
        end = pbs_harness.run_hook(hook, {"type": "execjob_end", "hook_config": settings, "job": job}, timeout=120)
    assert epilogue["verdict"] == "accept" and end["verdict"] == "accept", (epilogue, end)
    assert capacity(load_config(config)).guests == before
    # the guest's usage, read at teardown, charged to the job: its QEMU's CPU time (boot included) and memory
    (run,) = accounting(load_config(config), job_id=job_id).records
    charged = epilogue["job"]["resources_used"]
    assert int(charged["cput"]) == math.ceil(run.cpu_seconds) >= 1, (charged, run)
    assert charged["mem"] == f"{math.ceil((1024 * 1024 + run.max_memory_bytes) / 1024)}kb"
    assert int(charged["walltime"]) == max(round(run.wall_seconds), 9)  # the guest's run, or the mom's if more
