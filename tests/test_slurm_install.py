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
    assert (hooks / "plugstack.conf").read_text() == f"required {hooks}/blahvm_spank.so task={hooks}/task\n"
    # Slurm refuses a plugin built for another release: the version in it is this Slurm's
    plugin = ctypes.CDLL(str(hooks / "blahvm_spank.so"), mode=os.RTLD_LAZY)
    with open("/usr/include/slurm/slurm_version.h") as stream:
        number = next(int(line.split()[2], 16) for line in stream if line.startswith("#define SLURM_VERSION_NUMBER"))
    assert ctypes.c_uint32.in_dll(plugin, "plugin_version").value == number
    assert (ctypes.c_char * 6).in_dll(plugin, "plugin_type").value == b"spank"
    assert (ctypes.c_char * 7).in_dll(plugin, "plugin_name").value == b"blahvm"
    assert hasattr(plugin, "slurm_spank_task_init") and hasattr(plugin, "slurm_spank_init")
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
