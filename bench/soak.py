"""Soak with faults: N jobs through prepare / launch / teardown on qemu:///system, with kill -9
injected at seeded random points in every phase and libvirtd restarted once half-way; then one
``reap`` and the invariants.

    .venv/bin/python bench/soak.py [--jobs 200] [--concurrency 2] [--max-guests 2] [--seed 8]

Every phase runs in its own process, as a batch system runs its hooks: the prologue (``prepare``),
the job starter (``launch`` of ``echo soak-<job>; sleep 0.3``) and the epilogue (``teardown``). The
driver plays the batch system. For each job it draws (seeded) whether to kill -9 one phase and after
how long: a kill in prepare or launch is followed by the epilogue, as every batch system runs one;
a killed epilogue is run again, except for the jobs of the last round, which are left to the final
``reap`` alone. libvirtd is stopped (SIGTERM to the PID in /run/libvirtd.pid) once half the jobs
are done and started again with ``blahvm.services.ensure_libvirt()``; whatever happens, it runs
again at the end. An epilogue that answers retry-elsewhere (libvirt down) is run again, as batch
systems retry a failed epilogue.

Invariants checked after the reap (printed; ``check`` raises on the first broken one):

- no blahvm guest, clone volume, run dir or live ledger entry left of the soak's jobs;
- the ledger agrees with libvirt (no live entry without its guest, no guest without its entry);
- the host's slots are all free again;
- every job got exactly one outcome: one driver record each; at most one ledger entry each, closed;
  a job the driver saw finish had its payload's exact output and exit 0, and its entry closed ``ok``.

Prints its figures; asserts nothing itself (the exit code is 1 if an invariant is broken).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

URI = "qemu:///system"
LIBVIRTD_PID = "/run/libvirtd.pid"
READY_TIMEOUT = 180.0
CHILD_TIMEOUT = 300.0
PHASES = ("prepare", "launch", "teardown")
# how long after "go" a kill may land, per phase (seconds): covering each phase's usual length here
KILL_WINDOW = {"prepare": 7.0, "launch": 0.8, "teardown": 1.5}
KILL_SHARE = 0.5  # the share of jobs that get a kill -9 in one of their phases


def site_params(image, max_guests: int) -> dict:
    """A site of its own on qemu:///system: a unique pool and state/run dirs under /var/lib/blahvm."""
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="soak-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    env = image.environment("demo")
    return dict(
        where=where,
        uri=URI,
        pool=f"blahvm-soak-{uuid.uuid4().hex[:8]}",
        pool_path=os.path.join(where, "clones"),
        state_dir=os.path.join(where, "state"),
        run_dir=os.path.join(where, "run"),
        max_guests=max_guests,
        environment=dict(image=env.image, sha256=env.sha256, memory=int(env.memory), vcpus=env.vcpus,
                         kernel=env.kernel, initrd=env.initrd, cmdline=env.cmdline),
    )


def build_config(params: dict):
    from blahvm.model import Environment, HostConfig, HypervisorConfig, SiteConfig
    from blahvm.quantities import Size

    env = dict(params["environment"])
    env["memory"] = Size(env["memory"])
    return SiteConfig(
        hypervisor=HypervisorConfig(uri=params["uri"], pool=params["pool"], pool_path=params["pool_path"],
                                    domain_type="qemu", timeout=60),
        host=HostConfig(max_guests=params["max_guests"], state_dir=params["state_dir"], run_dir=params["run_dir"],
                        memory=Size(8192 * 1024**2), vcpus=16),
        environments={"demo": Environment(name="demo", flavour="kvm", **env)},
    )


def build_job(job_id: str, params: dict):
    from blahvm.model import Decision, Job
    from blahvm.quantities import Size

    env = params["environment"]
    decision = Decision(queue="short", environment="demo", rule="r", vo="cms", memory=Size(env["memory"]),
                        vcpus=env["vcpus"])
    return Job(job_id=job_id, user="nobody", decision=decision, uid=65534, gid=65534, name="soak")


CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
from bench.soak import build_config, build_job, READY_TIMEOUT
from blahvm.lifecycle import launch, prepare, teardown
params, step, job_id = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
config, job = build_config(params), build_job(job_id, params)
print("ready", flush=True)
sys.stdin.readline()  # "go"
if step == "prepare":
    result = prepare(config, job, ready_timeout=READY_TIMEOUT)
    print(json.dumps(dict(outcome=result.outcome.name, message=result.message)), flush=True)
elif step == "launch":
    read, write = os.pipe()
    code = launch(config, job, ["/bin/sh", "-c", "echo soak-$0; sleep 0.3", job_id], cwd="/",
                  stdout=write, stderr=2)
    os.close(write)
    out = os.read(read, 4096).decode("utf-8", "replace")
    print(json.dumps(dict(outcome="OK", code=code, out=out)), flush=True)
else:
    result = teardown(config, job_id)
    print(json.dumps(dict(outcome=result.outcome.name, message=result.message)), flush=True)
"""


def run_phase(params: dict, step: str, job_id: str, kill_after: Optional[float], children: set) -> Optional[dict]:
    """One hook process; None if it was killed (kill -9 ``kill_after`` s after go), else its JSON answer."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=ROOT), json.dumps(params), step, job_id],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    children.add(process)
    try:
        line = process.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"{step} for {job_id} did not start: {line!r}")
        process.stdin.write("go\n")
        process.stdin.flush()
        if kill_after is not None:
            try:
                process.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=CHILD_TIMEOUT)
                return None
        out, _ = process.communicate(timeout=CHILD_TIMEOUT)
        if process.returncode != 0:
            return dict(outcome="CRASHED", message=f"exit {process.returncode}")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        children.discard(process)


class Soak:
    def __init__(self, params: dict, jobs: int, concurrency: int, seed: int, log=print) -> None:
        self.params = dict(params, ready_timeout=READY_TIMEOUT)
        self.jobs = jobs
        self.concurrency = concurrency
        self.seed = seed
        self.log = log
        self.prefix = f"soak{uuid.uuid4().hex[:4]}-"
        self.records: Dict[str, List[dict]] = collections.defaultdict(list)
        self.kills = collections.Counter()  # phase -> kills that landed
        self.kills_planned = collections.Counter()
        self.teardown_retries = 0
        self.lock = threading.Lock()
        self.children: set = set()
        self.done = 0
        self.restart_at = jobs // 2
        self.restart_seconds: Optional[float] = None
        self.restart_done = threading.Event()
        self.elapsed = 0.0

    def job_id(self, n: int) -> str:
        return f"{self.prefix}{n:04d}"

    def plan(self, n: int) -> Optional[tuple]:
        rng = random.Random(f"{self.seed}-{n}")
        if rng.random() >= KILL_SHARE:
            return None
        phase = rng.choice(PHASES)
        return phase, rng.uniform(0.0, KILL_WINDOW[phase])

    def one_job(self, n: int) -> None:
        job_id = self.job_id(n)
        plan = self.plan(n)
        last_round = n >= self.jobs - self.concurrency
        if plan:
            with self.lock:
                self.kills_planned[plan[0]] += 1

        def delay(phase):
            return plan[1] if plan and plan[0] == phase else None

        record = dict(job=job_id, killed=None, outcome=None)
        prepared = run_phase(self.params, "prepare", job_id, delay("prepare"), self.children)
        if prepared is None:
            record.update(killed="prepare", outcome="killed in prepare")
        elif prepared["outcome"] != "OK":
            record.update(outcome=f"prepare {prepared['outcome']}", message=prepared["message"])
        else:
            launched = run_phase(self.params, "launch", job_id, delay("launch"), self.children)
            if launched is None:
                record.update(killed="launch", outcome="killed in launch")
            else:
                record.update(code=launched["code"], out=launched["out"])
                record["outcome"] = "ran" if launched["code"] == 0 else f"payload exit {launched['code']}"
        torn = run_phase(self.params, "teardown", job_id, delay("teardown"), self.children)
        if torn is None:
            record.update(killed="teardown", epilogue_killed=True)
        if torn is None and not last_round:
            torn = run_phase(self.params, "teardown", job_id, None, self.children)  # the epilogue again
        tries = 0
        while torn is not None and torn["outcome"] != "OK" and tries < 20:
            with self.lock:
                self.teardown_retries += 1
            self.restart_done.wait(timeout=5)
            time.sleep(1)
            torn = run_phase(self.params, "teardown", job_id, None, self.children)
            tries += 1
        record["teardown"] = None if torn is None else torn["outcome"]
        with self.lock:
            if record["killed"]:
                self.kills[record["killed"]] += 1
            self.records[job_id].append(record)
            self.done += 1
            done = self.done
        if done % 10 == 0 or done == self.jobs:
            self.log(f"soak: {done}/{self.jobs} jobs done")

    def restart_libvirtd(self) -> None:
        from blahvm.services import ensure_libvirt

        while True:
            with self.lock:
                if self.done >= self.restart_at:
                    break
            time.sleep(0.2)
        started = time.monotonic()
        try:
            stop_libvirtd()
            time.sleep(1.0)  # jobs meet a host without libvirtd for a moment
        finally:
            ensure_libvirt(URI, timeout=120)
            self.restart_seconds = time.monotonic() - started
            self.restart_done.set()
            self.log(f"soak: libvirtd restarted after {self.done} jobs ({self.restart_seconds:.1f}s without it)")

    def run(self) -> None:
        started = time.monotonic()
        restarter = threading.Thread(target=self.restart_libvirtd, daemon=True)
        restarter.start()
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                for future in [pool.submit(self.one_job, n) for n in range(self.jobs)]:
                    future.result()
        finally:
            for process in list(self.children):
                with contextlib.suppress(Exception):
                    process.kill()
            self.restart_done.wait(timeout=180)
        self.elapsed = time.monotonic() - started


def stop_libvirtd(timeout: float = 60.0) -> Optional[int]:
    """SIGTERM to the libvirtd named by its PID file, and wait until that process is gone."""
    try:
        with open(LIBVIRTD_PID) as stream:
            pid = int(stream.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        time.sleep(0.1)
    if os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    return pid


def inventory(config, prefix: str) -> dict:
    """What is left of the soak's jobs, on libvirt, in the pool, on disk and in the ledger."""
    from blahvm.hypervisor import guests, naming
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.storage import ClonePool
    from blahvm.ledger import Ledger

    with open_connection(URI, timeout=60) as conn:
        pool = ClonePool.ensure(conn, config.hypervisor.pool, config.hypervisor.pool_path)
        domains = sorted(g.name for g in guests.list_blahvm_guests(conn) if g.metadata.job_id.startswith(prefix))
        all_domains = {g.name for g in guests.list_blahvm_guests(conn)}
        volumes = sorted(v.name for v in pool.list_volumes())
    try:
        run_dirs = sorted(os.listdir(config.host.run_dir))
    except FileNotFoundError:
        run_dirs = []
    with Ledger(config.host) as ledger:
        live = ledger.live()
        free = ledger.free()
        history = ledger.history(limit=100000)
    return dict(
        domains=domains, volumes=volumes, run_dirs=run_dirs, live=[e.job_id for e in live],
        live_without_guest=[e.job_id for e in live if e.guest and e.guest not in all_domains],
        guests_without_entry=sorted(set(domains) - {naming.guest_name(e.job_id, config.host.state_dir) for e in live}),
        free_slots=free.guests, history=history,
    )


def check(soak: Soak, config) -> dict:
    """Reap once, then every invariant; returns the figures, raises AssertionError on the first broken one."""
    from blahvm.lifecycle import reap, templates
    from blahvm.model import Outcome

    # a job that booted for want of a saved state started a template maker: what it makes is the
    # site's, what it leaves once it ended is a leak
    assert templates.wait_for_makers(config, 900), "a template maker still works after 15 minutes"
    report = reap(config)
    assert report.outcome is Outcome.OK, f"reap: {report.message}"
    left = inventory(config, soak.prefix)
    problems = []
    for what in ("domains", "volumes", "run_dirs", "live", "live_without_guest", "guests_without_entry"):
        if left[what]:
            problems.append(f"{what} left: {left[what]}")
    if left["free_slots"] != config.host.max_guests:
        problems.append(f"free slots {left['free_slots']} of {config.host.max_guests}")
    entries = collections.defaultdict(list)
    for entry in left["history"]:
        entries[entry.job_id].append(entry)
    outcomes = collections.Counter()
    for n in range(soak.jobs):
        job_id = soak.job_id(n)
        records = soak.records.get(job_id, [])
        if len(records) != 1:
            problems.append(f"{job_id}: {len(records)} driver outcomes")
            continue
        record = records[0]
        outcomes[record["outcome"]] += 1
        mine = entries.get(job_id, [])
        if len(mine) > 1:
            problems.append(f"{job_id}: {len(mine)} ledger entries")
        if record["outcome"] == "ran":
            if record.get("out") != f"soak-{job_id}\n":
                problems.append(f"{job_id}: payload wrote {record.get('out')!r}")
            if not record.get("epilogue_killed") and (not mine or mine[0].outcome is not Outcome.OK):
                problems.append(f"{job_id}: ran but its ledger entry is {mine[0].outcome if mine else None}")
        elif record["outcome"].startswith("payload exit"):
            problems.append(f"{job_id}: {record['outcome']}")
    stray = sorted(set(entries) - {soak.job_id(n) for n in range(soak.jobs)})
    if stray:
        problems.append(f"ledger entries of unknown jobs: {stray}")
    figures = dict(
        jobs=soak.jobs, seconds=soak.elapsed, outcomes=dict(outcomes), kills=dict(soak.kills),
        kills_planned=dict(soak.kills_planned), teardown_retries=soak.teardown_retries,
        libvirtd_down_seconds=soak.restart_seconds, reaped=dict(
            guests=len(report.guests), volumes=len(report.volumes), run_dirs=len(report.run_dirs),
            entries=len(report.entries_closed)),
        ledger_outcomes=dict(collections.Counter(
            (e.outcome.value if e.outcome else "none") for e in left["history"])),
        leaked=dict(guests=len(left["domains"]), clones=len(left["volumes"]), slots=len(left["live"])),
        problems=problems,
    )
    return figures


def cleanup(params: dict, prefix: str) -> None:
    """Remove whatever the soak made, even if it failed half-way."""
    from blahvm.hypervisor import guests
    from blahvm.hypervisor.connection import open_connection
    from blahvm.services import ensure_libvirt

    ensure_libvirt(URI, timeout=120)
    with open_connection(URI, timeout=60) as conn:
        for guest in guests.list_blahvm_guests(conn):
            if guest.metadata.job_id.startswith(prefix):
                with contextlib.suppress(Exception):
                    guests.destroy_and_undefine(conn, guest.name)
        with contextlib.suppress(Exception):
            pool = conn.raw.storagePoolLookupByName(params["pool"])
            for volume in pool.listAllVolumes(0):
                volume.delete(0)
            pool.destroy()
            pool.undefine()
    shutil.rmtree(params["where"], ignore_errors=True)


def soak(jobs: int, concurrency: int = 2, max_guests: int = 2, seed: int = 8, log=print) -> dict:
    """Run the soak and check it; the figures (``problems`` empty when every invariant holds)."""
    from blahvm.image import build_demo_image
    from blahvm.image.demo import DEFAULT_DEST
    from blahvm.services import ensure_libvirt

    ensure_libvirt(URI, timeout=120)
    image = build_demo_image(os.environ.get("BLAHVM_TEST_IMAGE_DIR", DEFAULT_DEST))
    params = site_params(image, max_guests)
    run = Soak(params, jobs, concurrency, seed, log=log)
    try:
        run.run()
        return check(run, build_config(params))
    finally:
        try:
            ensure_libvirt(URI, timeout=120)  # libvirtd runs again at the end, whatever happened
        finally:
            cleanup(params, run.prefix)


def print_figures(figures: dict) -> None:
    print(f"soak: {figures['jobs']} jobs in {figures['seconds']:.0f}s "
          f"({figures['jobs'] / figures['seconds'] * 3600:.0f} jobs/hour with faults)")
    print(f"  kill -9 landed per phase: {figures['kills']} (planned {figures['kills_planned']})")
    print(f"  libvirtd down once for {figures['libvirtd_down_seconds'] or 0:.1f}s; "
          f"epilogues run again after retry-elsewhere: {figures['teardown_retries']}")
    print(f"  outcomes seen by the batch system: {figures['outcomes']}")
    print(f"  ledger outcomes: {figures['ledger_outcomes']}")
    print(f"  the final reap removed: {figures['reaped']}")
    print(f"  leaked after reap: {figures['leaked']}")
    print("  invariants: " + ("all hold" if not figures["problems"] else "BROKEN: " + "; ".join(figures["problems"])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--max-guests", type=int, default=2, help="host.max_guests (default 2)")
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("soak: needs root (libvirt qemu:///system, the demo image)")
    figures = soak(args.jobs, args.concurrency, args.max_guests, args.seed)
    print_figures(figures)
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
