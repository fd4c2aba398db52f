"""The Slurm hooks without a cluster: what job_submit.lua is told, and an Epilog on a broken host."""

from __future__ import annotations

import pytest

from blahvm.batch.slurm import INFINITE, NO_VAL, epilog_main, follow_main, health_main, route_line

SITE = """\
hypervisor: {{uri: "qemu+unix:///system?socket=/nonexistent/libvirt-sock", pool: p, pool_path: {d}/clones}}
host: {{max_guests: 1, memory: 2GiB, vcpus: 2, state_dir: {d}/state, run_dir: {d}/run, log_file: {d}/blahvm.log}}
defaults: {{walltime: 1h}}
environments:
  vm: {{image: /nonexistent.qcow2, sha256: "{sha}", memory: 1GiB, vcpus: 1, flavour: kvm}}
queues: {{grid: {{max_walltime: 2h}}, open: {{}}}}
routes:
  - {{name: capped, when: {{queue: grid}}, queue: grid, environment: vm}}
  - {{name: uncapped, when: {{queue: open}}, queue: open, environment: vm}}
"""


@pytest.fixture
def site(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(d=tmp_path, sha="0" * 64))
    return str(path)


def answer(site, tmp_path, partition, time=None):
    argv = ["--user", "root", "--partition", partition]
    if time is not None:
        argv += ["--time", str(time)]
    return route_line(site, argv, cache_dir=str(tmp_path / "cache")).split("\t")


@pytest.mark.parametrize("time, expected", [
    (None, "60"),  # no --time: the site's default walltime becomes the job's time limit
    (NO_VAL, "60"),  # what Lua passes when --time was not given
    (30, "30"),
    (120, "120"),
])
def test_the_routed_walltime_is_the_time_limit_job_submit_sets(site, tmp_path, time, expected):
    assert answer(site, tmp_path, "grid", time) == ["route", "grid", "vm", "capped", expected]


@pytest.mark.parametrize("time", [121, INFINITE])
def test_unlimited_is_the_longest_walltime_so_a_capped_queue_refuses_it(site, tmp_path, time):
    kind, reason = answer(site, tmp_path, "grid", time)
    shown = "UNLIMITED" if time == INFINITE else "121m"
    assert (kind, reason) == ("reject", f"walltime {shown} exceeds the 2h limit of queue grid (route capped)")


def test_unlimited_in_a_queue_without_a_cap_keeps_its_unlimited_time(site, tmp_path):
    assert answer(site, tmp_path, "open", INFINITE) == ["route", "open", "vm", "uncapped", ""]  # "": left as asked


def test_the_epilog_of_a_job_that_never_had_a_guest_needs_no_hypervisor(site, tmp_path):
    """libvirt down: the Prolog requeued the job before anything was made; its Epilog must not drain the node."""
    environ = {"SLURM_JOB_ID": "5300001", "SLURMD_NODENAME": "n1", "SLURM_JOB_USER": "nobody"}
    assert epilog_main(site, environ=environ) == 0
    assert "no guest was ever made" in (tmp_path / "blahvm.log").read_text()


def test_a_health_check_that_cannot_find_slurm_conf_says_so(site, monkeypatch, capfd):
    """slurmd gives HealthCheckProgram no SLURM_CONF: a slurm.conf elsewhere must have been named at install."""
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert health_main(site, environ={"SLURMD_NODENAME": "n1"}, slurm_conf="/nonexistent/slurm.conf") == 0
    said = capfd.readouterr().err
    assert said.count("\n") == 1 and "slurm.conf not found: /nonexistent/slurm.conf" in said, said
    assert "--slurm-conf" in said


def test_cores_are_per_node_for_a_job_on_several_nodes(site, tmp_path):
    """srun -N 2 -n 2: Slurm's min_cpus is the job's 2; each node's guest runs 1 (environment vm has 1 vcpu)."""
    argv = ["--user", "root", "--partition", "grid", "--cpus", "2"]
    cache = str(tmp_path / "cache")
    assert route_line(site, argv + ["--nodes", "2"], cache_dir=cache).startswith("route\t")
    assert route_line(site, argv + ["--nodes", str(NO_VAL)], cache_dir=cache).startswith("reject\t2 cores exceed")
    assert route_line(site, argv + ["--cpus", "3", "--nodes", "2"], cache_dir=cache).startswith("reject\t2 cores")


@pytest.mark.parametrize("argv", [[], ["5"], ["5", "0"], ["5", "-3"], ["x", "12"], ["5", "12", "13"],
                                  ["5", "1" * 40], ["5\n", "12"]])
def test_the_follow_hook_refuses_anything_but_a_job_id_and_a_pid(site, argv, capfd):
    assert follow_main(site, argv=argv) == 2
    assert capfd.readouterr().err == ""  # started detached by the SPANK plugin: nobody reads its stderr


def test_the_follow_hook_of_a_job_without_a_guest_says_so_and_ends(site, tmp_path):
    """The job's guest is gone (or never was): nothing to pause, one line in the log, no hypervisor needed."""
    assert follow_main(site, argv=["5300002", "1"]) == 1
    assert "no running guest" in (tmp_path / "blahvm.log").read_text()


def test_the_root_hooks_find_the_job_in_the_ledger_never_by_a_node_name_from_the_jobs_environment(site, tmp_path,
                                                                                                monkeypatch):
    """The SPANK plugin's root hooks get no environment of the job's: a SLURMD_NODENAME its user set
    must not choose which guest follow or charge acts on (it would keep the guest out of its job's
    suspension and cgroups)."""
    from blahvm.batch.slurm import _followed_key
    from blahvm.config import load_config
    from blahvm.ledger import Ledger
    from blahvm.quantities import Size

    config = load_config(site)
    with Ledger(config.host) as ledger:
        ledger.reserve("5300003@node7", "nobody", None, "vm", Size(2**28), 1)
    monkeypatch.setenv("SLURMD_NODENAME", "elsewhere")
    assert _followed_key(config, "5300003") == "5300003@node7"
