"""Many hosts: a real three-node Slurm (three slurmd, each its own hostname and mounts) over real guests.

Each node is a "host" with its own blahvm config (state dir, run dir, clone pool, log) bind-mounted
at the path fixed in the hooks, as separate machines would have, all from one `blahvm install
slurm`; the three share this machine's libvirtd. Every node offers one guest slot (``max_guests: 1``,
``Gres=blahvm:1``) and Slurm prefers n1, then n2, then n3 (``Weight``), so where a job lands says why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from tests.real_batch import remove_run_dirs, settle_templates
from tests.slurm_cluster import SlurmCluster, available

pytestmark = pytest.mark.guest

USER = "nobody"
NODES = ("n1", "n2", "n3")
BROKEN_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def _virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def _guests_of(node: str):
    """This cluster's guests on ``node``: the Slurm plugin names them after JOBID@NODE."""
    return [name for name in _virsh("list", "--all", "--name").stdout.split() if name.startswith("blahvm-")
            and f"_{node}-" in name]


@pytest.fixture(scope="module")
def hosts(demo_image):
    why = available()
    if why:
        pytest.skip(why)
    with open("/proc/self/mountinfo") as stream:  # each node's own config must not leak to the others
        root = next(line.split() for line in stream if line.split()[4] == "/")
    if any(tag.startswith("shared:") for tag in root[6:root.index("-")]):
        pytest.skip("/ is a shared mount here: a node's bind-mounted config would reach every node")
    from blahvm.hypervisor.kvm import resolve_domain_type

    base = tempfile.mkdtemp(prefix="blahvm-test-slurm3-", dir="/var/tmp")
    os.chmod(base, 0o755)
    vm = dict(yaml.safe_load(demo_image.environment_yaml("vm"))["vm"], vcpus=1)
    routes = {
        "defaults": {"walltime": "1h", "cores": 1},
        "environments": {"vm": vm},
        "queues": {"grid": {}, "vms": {"max_walltime": "10h"}},
        "routes": [
            {"name": "everyone", "when": {"queue": ["grid", "vms"], "user": USER}, "queue": "vms", "environment": "vm"},
            {"name": "nobody-else", "reject": "no execution environment is offered to this user"},
        ],
    }
    host_dir = os.path.join(base, "host")  # the path fixed in the hooks: each node sees its own config here
    configs = {}
    for node in ("ctl",) + NODES:  # ctl: what slurmctld's route hook reads (routing only)
        tag = f"{os.getpid()}-{node}"
        config = dict(routes, hypervisor={"uri": "qemu:///system", "pool": f"blahvm-test-slurm3-{tag}",
                                          "pool_path": f"{base}/clones-{node}",
                                          "domain_type": resolve_domain_type("auto")},
                      host={"max_guests": 1, "memory": "2GiB", "vcpus": 2, "state_dir": f"{base}/state-{node}",
                            "run_dir": f"/run/blahvm-slurm3-{tag}", "log_file": f"{base}/blahvm-{node}.log"})
        directory = host_dir if node == "ctl" else os.path.join(base, "nodes", node)
        os.makedirs(directory, mode=0o755)
        os.makedirs(config["host"]["state_dir"], mode=0o755)
        with open(os.path.join(directory, "site.yaml"), "w") as stream:
            yaml.safe_dump(config, stream)
        configs[node] = config
    work = os.path.join(base, "work")
    os.mkdir(work)
    os.chown(work, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
    yield {"base": base, "config": os.path.join(host_dir, "site.yaml"), "configs": configs, "work": work}
    for config in configs.values():
        _virsh("pool-destroy", config["hypervisor"]["pool"])
        _virsh("pool-undefine", config["hypervisor"]["pool"])
        remove_run_dirs(config["host"]["run_dir"])
    shutil.rmtree(base, ignore_errors=True)


def _node_config(hosts, node):
    return os.path.join(hosts["base"], "nodes", node, "site.yaml")


def _set_uri(hosts, node, uri):
    config = dict(hosts["configs"][node], hypervisor=dict(hosts["configs"][node]["hypervisor"], uri=uri))
    path = _node_config(hosts, node)
    with open(path + ".new", "w") as stream:
        yaml.safe_dump(config, stream)
    os.replace(path + ".new", path)


@pytest.fixture(scope="module")
def cluster(hosts):
    hooks = os.path.join(hosts["base"], "hooks")
    slurm_dir = os.path.join(hosts["base"], "slurm")
    os.mkdir(slurm_dir)
    env = dict(os.environ, BLAHVM_CACHE_DIR=os.path.join(hosts["base"], "cache"))
    installed = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "slurm", "--dir", hooks,
                                "--config", hosts["config"], "--task-python", "/usr/bin/python3",
                                "--slurm-user", "root", "--slurm-conf", os.path.join(slurm_dir, "slurm.conf")],
                               capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    lines = [line for line in installed.stdout.splitlines() if line and not line.startswith("#")]
    health = [line for line in lines if line.startswith("HealthCheck")]
    lines = [line for line in lines if not line.startswith("HealthCheck")]  # switched on by the test that needs it
    (node_options,) = [line[1:].strip() for line in installed.stdout.splitlines() if line.startswith("#   Features=")]
    assert node_options == "Features=vm Gres=blahvm:1", node_options
    nodes = ",".join(NODES)
    lines += [f"PartitionName=grid Nodes={nodes} Default=YES MaxTime=INFINITE State=UP",
              f"PartitionName=vms Nodes={nodes} MaxTime=INFINITE State=UP"]
    binds = {node: (os.path.dirname(_node_config(hosts, node)), os.path.dirname(hosts["config"])) for node in NODES}
    shared = {node: [hosts["configs"][node]["host"]["run_dir"] + "-shares"] for node in NODES}  # jobshare's root
    with SlurmCluster(lines, directory=slurm_dir, node_options=node_options, nodes=list(NODES), binds=binds,
                      shared=shared,
                      node_extra={node: f"Weight={n}" for n, node in enumerate(NODES, start=1)},
                      files={"job_submit.lua": os.path.join(hooks, "job_submit.lua")}) as running:
        running.hooks, running.lines, running.health_lines = hooks, lines, health
        yield running


def _logs(cluster, hosts) -> str:
    text = []
    for node in NODES:
        try:
            with open(hosts["configs"][node]["host"]["log_file"]) as stream:
                text.append(f"-- {node}:\n" + stream.read()[-1500:])
        except OSError:
            pass
    return "\n".join(text)


def _nothing_left_anywhere(cluster, hosts):
    from blahvm.config import load_config
    from blahvm.ledger import Ledger

    deadline = time.monotonic() + 120  # the last Epilogs may still be running
    while time.monotonic() < deadline and any(cluster.node_state(node) not in ("idle", "drained") for node in NODES):
        time.sleep(0.3)
    for node in NODES:
        settle_templates(_node_config(hosts, node))
        assert _guests_of(node) == [], (node, _guests_of(node))
        config = hosts["configs"][node]
        volumes = _virsh("vol-list", config["hypervisor"]["pool"]).stdout
        assert ".qcow2" not in volumes, (node, volumes)
        run_dir = config["host"]["run_dir"]
        assert not os.path.isdir(run_dir) or os.listdir(run_dir) == [], (node, os.listdir(run_dir))
        with Ledger(load_config(_node_config(hosts, node)).host) as ledger:
            assert [entry.job_id for entry in ledger.live()] == [], node


def _submit(cluster, hosts, script, *extra):
    out = os.path.join(hosts["work"], "job-%j.out")
    submitted = cluster.run(["sbatch", "--parsable", "-D", hosts["work"], "-o", out, *extra, "--wrap", script],
                            user=USER)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    return job_id, out.replace("%j", job_id)


def _done(cluster, hosts, job_id, timeout=300):
    try:
        return cluster.wait_job(job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=timeout)
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{_logs(cluster, hosts)}") from None


class _Sampler(threading.Thread):
    """The most guests each node ran at once, from libvirt and from each node's ledger, while jobs run."""

    def __init__(self, hosts):
        super().__init__(daemon=True)
        self.hosts, self.most, self.stop = hosts, {node: 0 for node in NODES}, threading.Event()

    def run(self):
        from blahvm.config import load_config
        from blahvm.ledger import Ledger

        configs = {node: load_config(_node_config(self.hosts, node)) for node in NODES}
        while not self.stop.is_set():
            for node in NODES:
                with Ledger(configs[node].host) as ledger:
                    live = len(ledger.live())
                self.most[node] = max(self.most[node], live, len(_guests_of(node)))
            time.sleep(0.2)


def test_jobs_spread_over_the_nodes_never_more_guests_per_node_than_it_offers(cluster, hosts):
    """Four jobs, three nodes of one slot (and two CPUs) each: three run at once, one per node, the fourth waits.
    Without the slot GRES, Slurm would put two on n1 (two CPUs, lowest weight)."""
    sampler = _Sampler(hosts)
    sampler.start()
    try:
        jobs = [_submit(cluster, hosts, "echo on $(hostname); sleep 4") for _ in range(4)]
        results = [_done(cluster, hosts, job_id) for job_id, _ in jobs]
    finally:
        sampler.stop.set()
        sampler.join()
    assert [r["JobState"] for r in results] == ["COMPLETED"] * 4, (results, _logs(cluster, hosts))
    assert {r["BatchHost"] for r in results[:3]} == set(NODES), [r["BatchHost"] for r in results]
    assert [r.get("Restarts") for r in results] == ["0"] * 4, _logs(cluster, hosts)  # none sent to a full node
    assert sampler.most == {node: 1 for node in NODES}, sampler.most  # each ran guests, never two at once
    for (job_id, out), result in zip(jobs, results):
        with open(out) as stream:
            said = stream.read()
        assert f"on blahvm-{job_id}-{result['BatchHost']}-" in said, said  # in the guest of that node
    _nothing_left_anywhere(cluster, hosts)


def test_a_two_node_job_gets_one_guest_per_node(cluster, hosts):
    """The nodes share one libvirtd: the two guests of job N are N@n1 and N@n2, never one name."""
    result = cluster.run(["srun", "-N", "2", "-n", "2", "-D", hosts["work"], "sh", "-c", "echo task $(hostname)"],
                         user=USER, timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr, _logs(cluster, hosts))
    names = sorted(line.split()[1] for line in result.stdout.splitlines() if line.startswith("task "))
    assert len(names) == 2 and names[0] != names[1], result.stdout
    assert [name.split("-")[2] for name in names] == ["n1", "n2"], names  # blahvm-JOBID-NODE-hash
    _nothing_left_anywhere(cluster, hosts)


def _wait_node(cluster, node, drained, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        fields = cluster.node(node)
        if ("DRAIN" in fields.get("State", "")) == drained:
            return fields
        assert time.monotonic() < deadline, (node, fields)
        time.sleep(0.5)


def test_a_node_whose_libvirt_breaks_is_drained_its_jobs_run_elsewhere_and_it_comes_back(cluster, hosts):
    # 1. The job reaches the broken node first: its Prolog answers RETRY_ELSEWHERE and requeues it, its
    #    Epilog (no guest was made) does not drain the node.
    _set_uri(hosts, "n1", BROKEN_URI)
    job_id, out = _submit(cluster, hosts, "echo ran on $(hostname)")
    deadline = time.monotonic() + 120
    fields = cluster.job(job_id)
    while int(fields.get("Restarts", "0")) < 1 or fields["JobState"] != "PENDING":
        assert time.monotonic() < deadline, (fields, _logs(cluster, hosts))
        time.sleep(0.3)
        fields = cluster.job(job_id)
    node = cluster.node("n1")
    assert "DRAIN" not in node["State"], node  # no "Epilog error"
    # 2. The health check (now periodic, as slurmd runs it) drains it with blahvm's reason.
    cluster.reconfigure(cluster.lines + ["HealthCheckProgram=" + cluster.health_lines[0].split("=", 1)[1],
                                         "HealthCheckInterval=5"])
    node = _wait_node(cluster, "n1", drained=True)
    assert node.get("Reason", "").startswith("blahvm: "), node
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")  # skip Slurm's delay before a requeued job
    result = _done(cluster, hosts, job_id)
    assert result["JobState"] == "COMPLETED" and result["BatchHost"] == "n2", (result, _logs(cluster, hosts))
    with open(out) as stream:
        assert f"ran on blahvm-{job_id}-n2-" in stream.read()
    # 3. Fixed: it comes back by itself (the next periodic check).
    _set_uri(hosts, "n1", "qemu:///system")
    _wait_node(cluster, "n1", drained=False)
    # 4. The health check reaches it first: drained before any job lands there, the job runs elsewhere at once.
    _set_uri(hosts, "n1", BROKEN_URI)
    _wait_node(cluster, "n1", drained=True)
    job_id, out = _submit(cluster, hosts, "echo ran on $(hostname)")
    result = _done(cluster, hosts, job_id)
    assert (result["JobState"], result["BatchHost"], result["Restarts"]) == ("COMPLETED", "n2", "0"), result
    _set_uri(hosts, "n1", "qemu:///system")
    node = _wait_node(cluster, "n1", drained=False)
    assert node["Gres"] == "blahvm:1", node
    _nothing_left_anywhere(cluster, hosts)
