"""``blahvm install slurm``: the hooks, job_submit.lua and the SPANK plugin it builds (no cluster needed)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest


def install(tmp_path, *extra):
    config = tmp_path / "site.yaml"
    config.write_text("environments: {}\n")
    hooks = tmp_path / "hooks"
    if "--slurm-user" not in extra:
        extra += ("--slurm-user", "root")  # as the test clusters run it; the check as another user is tested below
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--dir", str(hooks),
                           "--config", str(config), *extra], capture_output=True, text=True)
    return done, hooks


def spank_headers():
    if not os.path.isfile("/usr/include/slurm/spank.h"):
        pytest.skip("no slurm/spank.h (scripts/install-system-packages installs libslurm-dev)")


def test_the_spank_plugin_is_built_for_this_slurm_and_wired_to_the_task_wrapper(tmp_path):
    spank_headers()
    done, hooks = install(tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"PlugStackConfig={hooks}/plugstack.conf" in done.stdout.splitlines()
    assert "GresTypes=blahvm" in done.stdout.splitlines()
    assert "#   Features=NONE Gres=blahvm:1" in done.stdout.splitlines()  # no environments; max_guests 1
    assert (hooks / "plugstack.conf").read_text() == (
        f"required {hooks}/blahvm_spank.so task={hooks}/task follow={hooks}/follow charge={hooks}/charge\n")
    # Slurm refuses a plugin built for another release: the version in it is this Slurm's
    plugin = ctypes.CDLL(str(hooks / "blahvm_spank.so"), mode=os.RTLD_LAZY)
    with open("/usr/include/slurm/slurm_version.h") as stream:
        number = next(int(line.split()[2], 16) for line in stream if line.startswith("#define SLURM_VERSION_NUMBER"))
    assert ctypes.c_uint32.in_dll(plugin, "plugin_version").value == number
    assert (ctypes.c_char * 6).in_dll(plugin, "plugin_type").value == b"spank"
    assert (ctypes.c_char * 7).in_dll(plugin, "plugin_name").value == b"blahvm"
    assert hasattr(plugin, "slurm_spank_task_init") and hasattr(plugin, "slurm_spank_init")
    assert hasattr(plugin, "slurm_spank_task_post_fork")  # the extern step's: the guest charged to the job
    assert hasattr(plugin, "slurm_spank_task_init_privileged")  # starts the follow hook, as root
    lua = (hooks / "job_submit.lua").read_text()
    assert "@ROUTE@" not in lua and "@TASK@" not in lua
    assert f'local ROUTE = "{hooks}/route"' in lua and f'local TASK = "{hooks}/task"' in lua


def test_without_the_spank_plugin_it_says_how_srun_reaches_the_guest(tmp_path):
    done, hooks = install(tmp_path, "--no-spank")
    assert done.returncode == 0, done.stderr
    assert not (hooks / "blahvm_spank.so").exists() and "PlugStackConfig" not in done.stdout
    assert f"srun {hooks}/task -- COMMAND" in done.stdout


@pytest.mark.parametrize("extra, expected", [
    (["--slurm-include", "/nonexistent"], "no slurm/spank.h"),
    (["--cc", "/nonexistent/cc"], "no C compiler"),
    (["--cc", "false"], "false failed"),
])
def test_a_plugin_that_cannot_be_built_is_one_line_and_exit_2(tmp_path, extra, expected):
    if "--slurm-include" not in extra:
        spank_headers()
    done, hooks = install(tmp_path, *extra)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and expected in done.stderr and "--no-spank" in done.stderr, done.stderr
    assert not (hooks / "blahvm_spank.so").exists() and not (hooks / "plugstack.conf").exists()


def test_an_unreadable_config_stops_the_install_before_anything_is_written(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("environments: [\n")
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--no-spank", "--dir",
                           str(tmp_path / "hooks"), "--config", str(config)], capture_output=True, text=True)
    assert done.returncode == 2 and "site.yaml:2" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "hooks").exists()


def _readable_by_everyone(tmp_path):
    """A directory on a path every user can walk (pytest's own tmp_path is root's alone)."""
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="blahvm-install-", dir="/var/tmp")
    os.chmod(where, 0o755)
    return where, lambda: shutil.rmtree(where, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming SlurmUser needs root")
def test_the_install_runs_the_route_hook_as_slurm_user(tmp_path):
    """job_submit.lua runs the route hook as SlurmUser: an interpreter, blahvm or config it cannot read refuses
    every job, so the install tries it as that user and says so in one line."""
    where, cleanup = _readable_by_everyone(tmp_path)
    try:
        config = os.path.join(where, "site.yaml")
        with open(config, "w") as stream:
            stream.write("environments: {}\n")
        os.chmod(config, 0o644)
        argv = [sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--no-spank", "--dir",
                os.path.join(where, "hooks"), "--config", config, "--slurm-user", "nobody",
                "--python", "/usr/bin/python3"]
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        with open(os.path.join(where, "hooks", "route")) as stream:
            assert stream.readline().startswith("#!/usr/bin/python3 ")
        os.chmod(config, 0o600)  # as a site.yaml written by root's umask 077 would be
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "SlurmUser nobody cannot run" in done.stderr and "readable by nobody" in done.stderr, done.stderr
        assert "Permission denied" in done.stderr, done.stderr
    finally:
        cleanup()


def test_slurm_user_is_read_from_slurm_conf(tmp_path):
    from blahvm.cli.install_slurm import slurm_user

    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmUser=first\n# SlurmUser=commented\nslurmuser=daemon  # the last one wins\n")
    assert slurm_user(str(conf)) == "daemon"


def test_scheduler_parameters_are_to_be_merged_and_the_prolog_and_health_check_know_slurm_conf(tmp_path):
    done, hooks = install(tmp_path, "--no-spank", "--slurm-conf", "/etc/elsewhere/slurm.conf")
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("# merge into an existing SchedulerParameters=") for line in done.stdout.splitlines())
    for hook in ("health", "prolog"):
        assert "slurm_conf='/etc/elsewhere/slurm.conf'" in (hooks / hook).read_text()
