"""Reliability of prepare / teardown / reap under concurrency, crashes and bad goldens.

Other processes do the work here (prologues are separate processes on a real host): each child
builds its config from a JSON description, says "ready" once its imports are done, waits for "go",
runs one lifecycle step and prints its outcome. libvirt's test:///default driver keeps its state
per process, so it proves what lives in the ledger and on disk (slots, entries, run dirs); whatever
must be seen across processes (domains, volumes) is checked on the real qemu:///system daemon.
Real boots in this file: 2 (concurrency) + 4 (crashes) = 6.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import open_connection
from blahvm.hypervisor.storage import ClonePool
from blahvm.ledger import Ledger, State
from blahvm.lifecycle import prepare, reap, teardown
from blahvm.model import Decision, Environment, HostConfig, HypervisorConfig, Job, Outcome, SiteConfig
from blahvm.quantities import Size
from tests.test_lifecycle import guest_of, settle_templates

pytest.importorskip("libvirt")

MiB = 1024**2
TEST_URI = "test:///default"
REAL_URI = "qemu:///system"
READY_TIMEOUT = 120.0
CHILD_TIMEOUT = 180.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- configs that a child process can rebuild --------------------------------------------------


def build_config(params: dict) -> SiteConfig:
    env = dict(params["environment"])
    env["memory"] = Size(env["memory"])
    return SiteConfig(
        hypervisor=HypervisorConfig(
            uri=params["uri"], pool=params["pool"], pool_path=params["pool_path"], domain_type="qemu", timeout=60
        ),
        host=HostConfig(
            max_guests=params["max_guests"], state_dir=params["state_dir"], run_dir=params["run_dir"],
            memory=Size(4096 * MiB), vcpus=8,
        ),
        environments={"demo": Environment(name="demo", flavour="kvm", **env)},
    )


def build_job(job_id: str, params: dict) -> Job:
    env = params["environment"]
    decision = Decision(
        queue="short", environment="demo", rule="r", vo="cms", memory=Size(env["memory"]), vcpus=env["vcpus"]
    )
    return Job(job_id=job_id, user="nobody", decision=decision, uid=65534, gid=65534, name="reliability")


def test_params(tmp_path, image: str, sha256: str, max_guests: int = 2) -> dict:
    return dict(
        uri=TEST_URI,
        pool="blahvm",
        pool_path="/var/lib/blahvm/test-clones",  # the test driver makes no files
        state_dir=str(tmp_path / "state"),
        run_dir=str(tmp_path / "run"),
        max_guests=max_guests,
        environment=dict(image=image, sha256=sha256, memory=256 * MiB, vcpus=1),
    )


test_params.__test__ = False  # a helper, not a test


@contextlib.contextmanager
def real_params(demo_image, max_guests: int = 2):
    """A site on qemu:///system with its own pool, state and run dirs; everything removed afterwards."""
    from blahvm.services import ensure_libvirt

    ensure_libvirt(REAL_URI, timeout=90)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="reliability-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    env = demo_image.environment("demo")
    params = dict(
        uri=REAL_URI,
        pool=f"blahvm-test-{uuid.uuid4().hex[:8]}",
        pool_path=os.path.join(where, "clones"),
        state_dir=os.path.join(where, "state"),
        run_dir=os.path.join(where, "run"),
        max_guests=max_guests,
        environment=dict(
            image=env.image, sha256=env.sha256, memory=int(env.memory), vcpus=env.vcpus,
            kernel=env.kernel, initrd=env.initrd, cmdline=env.cmdline,
        ),
    )
    made = set()
    try:
        yield params, made
    finally:
        config = build_config(params)
        with open_connection(REAL_URI, timeout=30) as conn:
            for guest in made:  # whatever the test made, even if the ledger lost it
                with contextlib.suppress(Exception):
                    guests.destroy_and_undefine(conn, guest)
            with contextlib.suppress(Exception):
                reap(config)
            with contextlib.suppress(Exception):
                pool = conn.raw.storagePoolLookupByName(params["pool"])
                for volume in pool.listAllVolumes(0):
                    volume.delete(0)
                pool.destroy()
                pool.undefine()
        shutil.rmtree(where, ignore_errors=True)


# -- what is left ------------------------------------------------------------------------------


def live_entries(config):
    with Ledger(config.host) as ledger:
        return ledger.live()


def leftovers(config, conn) -> dict:
    """Everything of blahvm's this site still has; empty lists when nothing is left. Its template
    makers are waited for first: what they make is the site's, what they leave a leak."""
    settle_templates(config)
    pool = ClonePool.ensure(conn, config.hypervisor.pool, config.hypervisor.pool_path)
    try:
        # a guest's control socket (RUN_DIR.ctl) belongs to its run dir; alone, it is a leak by its name
        run_dirs = sorted({name[: -len(".ctl")] if name.endswith(".ctl") else name
                           for name in os.listdir(config.host.run_dir)})
    except FileNotFoundError:
        run_dirs = []
    here = {guest_of(config, entry.job_id) for entry in live_entries(config)}
    return dict(
        domains=sorted(g.name for g in guests.list_blahvm_guests(conn) if g.metadata.job_id.startswith("rel-")),
        volumes=sorted(v.name for v in pool.list_volumes() if v.name.startswith(naming.PREFIX)),
        run_dirs=run_dirs,
        live=sorted(here),
    )


NOTHING = dict(domains=[], volumes=[], run_dirs=[], live=[])


def only(guest: str) -> dict:
    """What a site with one live job and nothing else has."""
    return dict(domains=[guest], volumes=[guest + ".qcow2"], run_dirs=[guest], live=[guest])


# -- child processes ---------------------------------------------------------------------------

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_lifecycle_reliability import build_config, build_job
from blahvm.lifecycle import prepare, teardown
params, step, job_id = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
config, job = build_config(params), build_job(job_id, params)
print("ready", flush=True)
sys.stdin.readline()  # "go"
if step == "prepare":
    result = prepare(config, job, ready_timeout=params.get("ready_timeout"))
else:
    result = teardown(config, job_id)
print(json.dumps(dict(outcome=result.outcome.name, message=result.message)), flush=True)
"""


class Child:
    """One lifecycle step in its own process, started only when told to go."""

    def __init__(self, params: dict, step: str, job_id: str) -> None:
        self.job_id = job_id
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(root=ROOT), json.dumps(params), step, job_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        line = self.process.stdout.readline()
        assert line == "ready\n", f"child for {job_id} did not start: {line!r}"

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self) -> dict:
        out, _ = self.process.communicate(timeout=CHILD_TIMEOUT)
        assert self.process.returncode == 0, f"child for {self.job_id} exited {self.process.returncode}"
        return json.loads(out)

    def kill(self) -> None:
        """SIGKILL, then wait: a prologue the batch system killed is reaped by its parent."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.communicate(timeout=CHILD_TIMEOUT)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.kill()


def run_together(params: dict, step: str, job_ids) -> dict:
    """Start every child, then let them all go at once; job id -> result."""
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(Child(params, step, job_id)) for job_id in job_ids]
        for child in children:
            child.go()
        return {child.job_id: child.result() for child in children}


def kill_after(params: dict, step: str, job_id: str, delay: float) -> None:
    with Child(params, step, job_id) as child:
        child.go()
        time.sleep(delay)
        child.kill()


# -- a. concurrent prepares never over-commit --------------------------------------------------


def assert_exactly_two_ok(results: dict) -> None:
    outcomes = sorted(result["outcome"] for result in results.values())
    assert outcomes.count("OK") == 2, results
    assert set(outcomes) <= {"OK", "RETRY_ELSEWHERE"}, results
    for result in results.values():
        if result["outcome"] == "RETRY_ELSEWHERE":
            assert "guests exhausted" in result["message"] and "\n" not in result["message"], result


def test_many_concurrent_prepares_take_exactly_the_free_slots(tmp_path, golden, keep_driver):
    # The slot decision is the ledger's alone (one BEGIN IMMEDIATE transaction, before any libvirt
    # call), so separate processes on per-process test drivers race exactly as real prologues do.
    params = test_params(tmp_path, *golden, max_guests=2)
    config = build_config(params)
    job_ids = [f"rel-{n}" for n in range(8)]
    results = run_together(params, "prepare", job_ids)
    assert_exactly_two_ok(results)
    winners = {job_id for job_id, result in results.items() if result["outcome"] == "OK"}
    live = live_entries(config)
    assert {entry.job_id for entry in live} == winners
    assert sorted(entry.slot for entry in live) == [0, 1]
    for job_id in job_ids:
        assert teardown(config, job_id).outcome is Outcome.OK
    assert leftovers(config, keep_driver) == NOTHING


@pytest.mark.guest
def test_real_concurrent_prepares_boot_two_of_three_then_teardown_leaves_nothing(demo_image):
    with real_params(demo_image, max_guests=2) as (params, made):
        config = build_config(params)
        params["ready_timeout"] = READY_TIMEOUT
        job_ids = [f"rel-{uuid.uuid4().hex[:6]}" for _ in range(3)]
        made.update(guest_of(config, job_id) for job_id in job_ids)
        results = run_together(params, "prepare", job_ids)
        assert_exactly_two_ok(results)
        with open_connection(REAL_URI, timeout=30) as conn:
            winners = sorted(guest_of(config, j) for j, r in results.items() if r["outcome"] == "OK")
            assert leftovers(config, conn)["domains"] == winners
            for job_id in job_ids:
                assert teardown(config, job_id).outcome is Outcome.OK
            assert leftovers(config, conn) == NOTHING


# -- b. crashes at any point, then reap ----------------------------------------------------------

SEED = 20240607


def test_kill_9_of_prepare_at_random_points_then_reap_keeps_only_the_live_job(tmp_path, golden, keep_driver):
    # On the test driver a child's guest dies with it; what a crash can leave that others see is the
    # ledger entry and the run dir, both of which reap must clear, and never the parent's live job.
    params = test_params(tmp_path, *golden, max_guests=3)
    config = build_config(params)
    live_job = build_job("rel-live", params)
    assert prepare(config, live_job, ready_timeout=None).outcome is Outcome.OK
    with Ledger(config.host) as ledger:
        ledger.transition(live_job.job_id, State.BOOTING, State.RUNNING)  # as after wait_ready
    # Here prepare reaches "booting" ~20 ms after "go", then waits for an agent socket that the test
    # driver never makes: the delays land before the reservation, in it, in cloning and in booting.
    params["ready_timeout"] = 5.0
    delays = [0.0] + [random.Random(SEED + n).uniform(0.0, 0.04) for n in range(11)]
    states_hit = []
    for n, delay in enumerate(delays):
        kill_after(params, "prepare", f"rel-killed-{n}", delay)
        with Ledger(config.host) as ledger:
            killed = ledger.get(f"rel-killed-{n}")
        states_hit.append(killed.state.value if killed else "none")
        report = reap(config)
        assert report.outcome is Outcome.OK, report.message
        left = leftovers(config, keep_driver)
        assert left == only(guest_of(config, live_job.job_id)), f"after a kill at {delay:.3f}s in {states_hit[-1]}"
    print(f"kill points hit: {sorted(states_hit)}")
    assert teardown(config, live_job.job_id).outcome is Outcome.OK
    assert leftovers(config, keep_driver) == NOTHING


@pytest.mark.guest
def test_real_kill_9_of_prepare_never_costs_the_live_job_and_a_killed_teardown_reruns_clean(demo_image):
    with real_params(demo_image, max_guests=2) as (params, made):
        config = build_config(params)
        params["ready_timeout"] = READY_TIMEOUT
        live_job = build_job(f"rel-live-{uuid.uuid4().hex[:6]}", params)
        live_guest = guest_of(config, live_job.job_id)
        made.add(live_guest)
        assert prepare(config, live_job, ready_timeout=READY_TIMEOUT).outcome is Outcome.OK
        with open_connection(REAL_URI, timeout=30) as conn:
            for delay in [random.Random(SEED + n).uniform(0.0, 3.0) for n in range(2)]:
                job_id = f"rel-killed-{uuid.uuid4().hex[:6]}"
                made.add(guest_of(config, job_id))
                kill_after(params, "prepare", job_id, delay)
                report = reap(config)
                assert report.outcome is Outcome.OK, report.message
                assert guests.domain_state(conn, live_guest) == "running", f"after a kill at {delay:.2f}s"
                assert live_guest in leftovers(config, conn)["live"]
                # Whatever reap left of the killed job, its epilogue removes.
                assert teardown(config, job_id).outcome is Outcome.OK
                assert leftovers(config, conn) == only(live_guest), f"after a kill at {delay:.2f}s"
            # The epilogue killed while taking the guest apart; the batch system runs it again.
            kill_after(params, "teardown", live_job.job_id, 0.05)
            assert teardown(config, live_job.job_id).outcome is Outcome.OK
            assert leftovers(config, conn) == NOTHING


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.guest
def test_real_prepare_killed_while_waiting_for_the_agent_is_reaped(demo_image):
    with real_params(demo_image, max_guests=2) as (params, made):
        config = build_config(params)
        params["ready_timeout"] = READY_TIMEOUT
        job_id = f"rel-killed-{uuid.uuid4().hex[:6]}"
        guest = guest_of(config, job_id)
        made.add(guest)
        with open_connection(REAL_URI, timeout=30) as conn, Child(params, "prepare", job_id) as child:
            child.go()
            wait_for(lambda: guests.domain_state(conn, guest) == "running", 60, "the guest to start")
            child.kill()  # the agent needs seconds more under TCG: this lands in the wait for its hello
            with Ledger(config.host) as ledger:
                assert ledger.get(job_id).state is State.BOOTING
            reap(config)
            assert leftovers(config, conn) == NOTHING


# -- c. re-runs are harmless; bad goldens fail the job and leave nothing -----------------------


def test_rerunning_prepare_and_teardown_is_harmless(tmp_path, golden, keep_driver):
    params = test_params(tmp_path, *golden, max_guests=1)
    config = build_config(params)
    job = build_job("rel-again", params)
    for _ in range(2):  # the batch system requeues the job under the same id
        first, second = prepare(config, job, ready_timeout=None), prepare(config, job, ready_timeout=None)
        assert (first.outcome, second.outcome, second.reused) == (Outcome.OK, Outcome.OK, True), second.message
        assert len(live_entries(config)) == 1
        assert teardown(config, job.job_id).outcome is Outcome.OK
        assert teardown(config, job.job_id).outcome is Outcome.OK
        assert leftovers(config, keep_driver) == NOTHING


def test_checksum_mismatch_fails_the_job_and_leaves_nothing(tmp_path, golden, keep_driver):
    path, sha = golden
    params = test_params(tmp_path, path, "0" * 64)
    config = build_config(params)
    result = prepare(config, build_job("rel-sum", params), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB, result.message
    assert "sha256" in result.message and sha[:12] in result.message and "\n" not in result.message
    assert leftovers(config, keep_driver) == NOTHING
    with Ledger(config.host) as ledger:
        assert ledger.get("rel-sum") is None  # refused before a slot was taken


def test_golden_naming_a_backing_file_fails_the_job_and_leaves_nothing(tmp_path, golden, keep_driver):
    # A golden whose header points at another file would make QEMU read that file for the guest.
    base = tmp_path / "secret.raw"
    base.write_bytes(b"host secret\n" + b"\0" * (MiB - 12))
    sneaky = tmp_path / "sneaky.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(sneaky)], check=True
    )
    sha = hashlib.sha256(sneaky.read_bytes()).hexdigest()  # a correct checksum does not make it safe
    params = test_params(tmp_path, str(sneaky), sha)
    config = build_config(params)
    result = prepare(config, build_job("rel-backing", params), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB, result.message
    assert "backing" in result.message and "\n" not in result.message
    assert leftovers(config, keep_driver) == NOTHING
    with Ledger(config.host) as ledger:
        assert ledger.get("rel-backing") is None
