"""blahvm's performance table: every figure the bench modules measure, in one table, with the baseline
measured in the same run and the ratio side by side.

    bench/run [--quick] [--soak-jobs N]

Needs root, libvirtd (started if it is not running) and the demo image (built on first use).
``--quick`` takes fewer samples and runs a 20-job soak instead of the full 200. Prints; asserts nothing.

Sustained jobs/hour: JOBS jobs (``echo``), each its own prologue (prepare), job starter (launch) and
epilogue (teardown) process, are run back to back, 4 at a time, on a host with ``max_guests: 4``;
jobs/hour = JOBS / (wall time from the first prepare to the last teardown) x 3600. The first and
last job overlap less than the others, so this slightly understates a host that never idles.

Peak RSS of a hook: each hook runs as its batch system runs it (tests/lsf_harness.py) in a process
of its own; the figure is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of that process, i.e. the largest
process in the hook's tree (the ``/bin/sh -c`` LSF wraps it in included). The elim is read for one
report cycle; its figure is its own ``VmHWM``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_agent  # noqa: E402
import bench_esub  # noqa: E402
import bench_lifecycle  # noqa: E402
import bench_restore  # noqa: E402
import bench_routing  # noqa: E402
import soak  # noqa: E402

URI = "qemu:///system"


class Rows:
    """The table: printed row by row as figures arrive, so a failure later still leaves the figures."""

    def __init__(self) -> None:
        self.rows = []
        print(f"{'figure':<58} {'value':>16}   {'baseline (same run)':<30} {'ratio':>8}", flush=True)
        print("-" * 118, flush=True)

    def add(self, label: str, value: str, baseline: str = "", ratio: str = "") -> None:
        self.rows.append((label, value, baseline, ratio))
        print(f"{label:<58} {value:>16}   {baseline:<30} {ratio:>8}", flush=True)

    def section(self, title: str) -> None:
        print(f"# {title}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def med(samples) -> float:
    return statistics.median(samples)


# -- 1. routing and the submission hook ---------------------------------------------------------


def routing(rows: Rows, quick: bool) -> None:
    rows.section("routing (in process, pure)")
    for routes in (10, 100, 1000):
        rate = max(bench_routing.decisions_per_second(routes) for _ in range(1 if quick else 3))
        rows.add(f"routing decisions/s, {routes:,} routes", f"{rate:,.0f} /s")
    rows.section("submission hook, cold start (whole process)")
    bare, isolated, hook = bench_esub.measure(20 if quick else 100)
    rows.add("LSF esub.blahvm (routed, table cached)", ms(hook), f"python -c pass {ms(bare)}", f"{hook / bare:.2f}x")
    rows.add("  for contrast: python -IS -c pass", ms(isolated), f"python -c pass {ms(bare)}",
             f"{isolated / bare:.2f}x")


# -- 2. the hypervisor layer --------------------------------------------------------------------


def lifecycle(rows: Rows, quick: bool, image_dir: str) -> None:
    rows.section("clone, prepare, teardown, overhead over plain libvirt (qemu:///system, TCG)")
    args = types.SimpleNamespace(runs=2 if quick else 4, quick_runs=3 if quick else 6,
                                 clone_runs=3 if quick else 7, image_dir=image_dir)
    figures = bench_lifecycle.measure(args, echo=False).figures
    c100, c2g = med(figures["clone_100m"]), med(figures["clone_2g"])
    rows.add("clone (qcow2 overlay), 2 GiB golden", ms(c2g), f"100 MiB golden {ms(c100)}", f"{c2g / c100:.2f}x")
    f100, f2g = med(figures["copy_100m"]), med(figures["copy_2g"])
    rows.add("  for contrast: full copy, 2 GiB golden", ms(f2g), f"100 MiB golden {ms(f100)}", f"{f2g / f100:.2f}x")
    prep, ready = med(figures["prepare"]), med(figures["ready"])
    rows.add(f"prepare to running (agent answers), n={len(figures['prepare'])}", ms(prep),
             f"of which agent boot {ms(ready)}", f"{ready / prep:.0%}")
    torn = figures["teardown"] + figures["teardown_nowait"]
    rows.add(f"teardown, n={len(torn)}", ms(med(torn)))
    destroy = figures.get("teardown_destroy", []) + figures.get("teardown_destroy_nowait", [])
    exited = figures.get("teardown_qemu_exit", []) + figures.get("teardown_qemu_exit_nowait", [])
    rest = figures.get("teardown_rest", []) + figures.get("teardown_rest_nowait", [])
    if destroy:
        rows.add("  of which libvirt's destroy+undefine", ms(med(destroy)),
                 f"QEMU itself exited after {ms(med(exited))}" if exited else "", f"{med(destroy) / med(torn):.0%}")
    if rest:
        rows.add("  teardown without libvirt's destroy (blahvm's own work)", ms(med(rest)), "goal 300 ms",
                 f"{med(rest) / 0.300:.2f}x")
    for key, what in (("", "with boot to agent"), ("_nowait", "define+start only")):
        bare, mine = med(figures[f"bare{key}"]), med(figures[f"blahvm{key}"])
        rows.add(f"blahvm prepare+teardown ({what}), n={len(figures[f'bare{key}'])}", ms(mine),
                 f"plain libvirt {ms(bare)}", f"{mine / bare:.3f}x")
        rows.add(f"  blahvm's overhead ({what})", f"{(mine - bare) * 1000:+,.1f} ms", "", f"{(mine - bare) / bare:+.1%}")


def restore_vs_boot(rows: Rows, quick: bool, image_dir: str) -> None:
    rows.section("a job's guest from a saved post-boot state vs a cold boot (same environment, alternating)")
    figures = bench_restore.measure(2 if quick else 5, image_dir)
    restore, boot = med(figures["restore"]), med(figures["boot"])
    rows.add(f"prepare to running, restored (start: auto), n={len(figures['restore'])}", ms(restore),
             f"cold boot {ms(boot)}", f"{restore / boot:.2f}x")
    rows.add("template per environment and shape: state / disk", f"{figures['state_bytes'] / 2**20:.1f} MiB",
             f"frozen disk {figures['disk_bytes'] / 2**20:.1f} MiB")
    rows.add("template making (boot to agent, save)", ms(figures["make"]))


# -- 3. one real guest: launch round trip, stdout throughput, hook RSS ---------------------------


def agent(rows: Rows, quick: bool, demo) -> None:
    rows.section("launch through the agent")
    params = soak.site_params(demo, max_guests=2)
    config = soak.build_config(params)
    from blahvm.lifecycle import prepare, teardown
    from blahvm.model import Outcome

    job = soak.build_job(f"bench-{uuid.uuid4().hex[:6]}", params)
    local_dir = tempfile.mkdtemp(prefix="blahvm-bench-agent-")
    local = None
    try:
        result = prepare(config, job, ready_timeout=180)
        if result.outcome is not Outcome.OK:
            rows.add("launch: the guest did not come up", result.message[:60])
            return
        local, local_sock = bench_agent.local_agent(local_dir)
        runs, megabytes = (15, 50) if quick else (50, 200)
        bench_agent.round_trips(result.socket, 3)
        guest_rt = med(bench_agent.round_trips(result.socket, runs))
        local_rt = med(bench_agent.round_trips(local_sock, runs))
        rows.add(f"launch round trip of /bin/true in the guest, n={runs}", ms(guest_rt),
                 f"same agent on a local socket {ms(local_rt)}", f"{guest_rt / local_rt:.1f}x")
        guest_mb = max(bench_agent.throughput(result.socket, megabytes) for _ in range(3))
        local_mb = max(bench_agent.throughput(local_sock, megabytes) for _ in range(3))
        rows.add(f"stdout relayed from the guest, best of 3 x {megabytes} MB", f"{guest_mb:,.0f} MB/s",
                 f"local socket {local_mb:,.0f} MB/s", f"{guest_mb / local_mb:.2f}x")
    finally:
        if local is not None:
            local.kill()
            local.wait()
        shutil.rmtree(local_dir, ignore_errors=True)
        teardown(config, job.job_id)
        soak.cleanup(params, "bench-")


# -- 4. sustained jobs per hour -----------------------------------------------------------------


def jobs_per_hour(rows: Rows, quick: bool, demo) -> None:
    rows.section("sustained throughput, one host, max_guests: 4")
    jobs = 8 if quick else 24
    params = soak.site_params(demo, max_guests=4)
    run = soak.Soak(params, jobs, concurrency=4, seed=0, log=lambda line: None)
    run.plan = lambda n: None  # no faults
    run.restart_at = jobs + 1  # no libvirtd restart
    run.restart_done.set()
    try:
        started = time.monotonic()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(run.one_job, n) for n in range(jobs)]:
                future.result()
        elapsed = time.monotonic() - started
    finally:
        soak.cleanup(params, run.prefix)
    ran = sum(1 for records in run.records.values() if records[0]["outcome"] == "ran")
    rows.add(f"jobs/hour, {jobs} jobs 4 at a time ({ran} ran), extrapolated", f"{jobs / elapsed * 3600:,.0f} /h",
             f"{elapsed:.0f} s for {jobs} jobs", "")
    rows.add("  mean wall time per job slot", f"{elapsed * 4 / jobs:.1f} s")


# -- 5. peak RSS of each hook -------------------------------------------------------------------


TIME = "/usr/bin/time"  # GNU time: its %M is the peak RSS of the process it runs, in KiB


def wrap_with_time(serverdir: str, hook: str, rss_dir: str) -> str:
    """Put GNU time in front of an installed hook (same name, same argv); the file its figure lands in."""
    path = os.path.join(serverdir, hook)
    real = path + ".measured"
    os.rename(path, real)
    out = os.path.join(rss_dir, hook)
    with open(path, "w") as stream:
        stream.write(f'#!/bin/sh\nexec {TIME} -q -a -f %M -o {out} {real} "$@"\n')
    os.chmod(path, 0o755)
    return out


def peak_kib(out: str) -> int:
    with open(out) as stream:
        return max(int(line) for line in stream if line.strip().isdigit())


def hook_rss(rows: Rows, demo) -> None:
    rows.section("peak RSS of each hook (LSF hooks, run as LSF runs them)")
    from tests import lsf_harness as lsf

    directory = tempfile.mkdtemp(prefix="blahvm-bench-rss-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    pool = f"blahvm-bench-rss-{uuid.uuid4().hex[:6]}"
    config, serverdir = lsf.write_guest_site(directory, pool, demo)
    job_id = str(80000 + os.getpid() % 10000)
    env = None
    try:
        installed = lsf.install(serverdir, config, os.path.join(directory, "cache"))
        if installed.returncode != 0:
            rows.add("hook RSS: install lsf failed", installed.stderr.strip()[:60])
            return
        rss_dir = os.path.join(directory, "rss")
        os.mkdir(rss_dir)
        os.chmod(rss_dir, 0o1777)  # the esub and the job starter run as the user
        outs = {hook: wrap_with_time(serverdir, hook, rss_dir)
                for hook in ("esub.blahvm", "blahvm-pre-exec", "blahvm-job-starter", "blahvm-post-exec")}
        base_out = os.path.join(rss_dir, "bare")
        subprocess.run([TIME, "-q", "-f", "%M", "-o", base_out, lsf.SYSTEM_PYTHON, "-c", "pass"], check=True)
        bare = peak_kib(base_out)
        baseline = f"python -c pass {bare / 1024:.1f} MiB"

        def row(label, hook):
            rss = peak_kib(outs[hook])
            rows.add(label, f"{rss / 1024:.1f} MiB", baseline, f"{rss / bare:.2f}x")

        done = lsf.run_esub(serverdir, 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="cms"\n'
                                       'LSB_SUB_RLIMIT_RUN=300\nLSB_SUB_ADDITIONAL="blahvm(slc4)"\n')
        if done.code != 0:
            rows.add("hook RSS: the esub refused", done.stderr.strip()[:60])
            return
        row("esub (as the user: route)", "esub.blahvm")
        lsf.set_project(serverdir, job_id, "cms")  # what the stand-in bjobs answers PRE_EXEC
        env = lsf.job_env(job_id, "short", "nobody", lsf.env_lines(done.envfile), LS_SUBCWD="/tmp")
        if lsf.run_pre_exec(serverdir, env, timeout=300) != 0:
            rows.add("hook RSS: PRE_EXEC failed", "")
            return
        row("PRE_EXEC (as root: clone, boot, wait for the agent)", "blahvm-pre-exec")
        started = lsf.run_job_starter(serverdir, env, "/bin/echo hello", "nobody", "/tmp")
        if started.returncode == 0:
            row("JOB_STARTER (as the user: launch)", "blahvm-job-starter")
        else:
            rows.add("hook RSS: JOB_STARTER failed", started.stderr.decode(errors="replace").strip()[:60])
        code = lsf.run_post_exec(serverdir, env, 0, timeout=300)
        env = None if code == 0 else env
        row("POST_EXEC (as root: teardown)", "blahvm-post-exec")
        elims = [name for name in os.listdir(serverdir) if name.startswith("elim.")]
        if elims:
            process = lsf.start_elim(serverdir, elims[0], "blahvm_slots")
            try:
                line = process.stdout.readline()
                with open(f"/proc/{process.pid}/status") as stream:
                    hwm = next(int(x.split()[1]) for x in stream if x.startswith("VmHWM:"))
            finally:
                process.kill()
                process.wait()
            rows.add(f"elim, one cycle ({line.split()[0].decode() if line.split() else 'no report'} resources)",
                     f"{hwm / 1024:.1f} MiB", baseline, f"{hwm / bare:.2f}x")
    finally:
        if env is not None:
            lsf.run_post_exec(serverdir, env, 0, timeout=300)
        subprocess.run(["virsh", "-c", URI, "pool-destroy", pool], capture_output=True)
        subprocess.run(["virsh", "-c", URI, "pool-undefine", pool], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


# -- 6. the soak --------------------------------------------------------------------------------


def run_soak(rows: Rows, jobs: int) -> None:
    rows.section(f"soak with faults ({jobs} jobs, kill -9 in every phase, one libvirtd restart)")
    figures = soak.soak(jobs, concurrency=2, max_guests=2, seed=8, log=lambda line: None)
    rows.add("jobs, wall time", f"{jobs}", f"{figures['seconds']:.0f} s", "")
    rows.add("kill -9 landed: prepare / launch / teardown",
             " / ".join(str(figures["kills"].get(p, 0)) for p in soak.PHASES))
    rows.add("outcomes: ran / killed / retry-elsewhere", " / ".join(str(n) for n in (
        figures["outcomes"].get("ran", 0),
        sum(v for k, v in figures["outcomes"].items() if k.startswith("killed")),
        sum(v for k, v in figures["outcomes"].items() if "RETRY" in k))))
    rows.add("removed by the final reap: guests / clones / entries", " / ".join(
        str(figures["reaped"][k]) for k in ("guests", "volumes", "entries")))
    rows.add("leaked after reap: guests / clones / slots", " / ".join(
        str(figures["leaked"][k]) for k in ("guests", "clones", "slots")))
    rows.add("invariants", "all hold" if not figures["problems"] else "BROKEN")
    for problem in figures["problems"]:
        print(f"  {problem}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, a 20-job soak")
    parser.add_argument("--soak-jobs", type=int, help="jobs in the soak (default 200, 20 with --quick; 0: none)")
    parser.add_argument("--image-dir", default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/run: needs root (libvirt qemu:///system, the demo image, hooks as other users)")
    from blahvm.image import build_demo_image
    from blahvm.image.demo import DEFAULT_DEST
    from blahvm.services import ensure_libvirt

    ensure_libvirt(URI, timeout=120)
    image_dir = args.image_dir or os.environ.get("BLAHVM_TEST_IMAGE_DIR", DEFAULT_DEST)
    demo = build_demo_image(image_dir)
    started = time.monotonic()
    print(f"blahvm performance table ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = Rows()
    steps = [
        lambda: routing(rows, args.quick),
        lambda: lifecycle(rows, args.quick, image_dir),
        lambda: restore_vs_boot(rows, args.quick, image_dir),
        lambda: agent(rows, args.quick, demo),
        lambda: jobs_per_hour(rows, args.quick, demo),
        lambda: hook_rss(rows, demo),
    ]
    soak_jobs = args.soak_jobs if args.soak_jobs is not None else (20 if args.quick else 200)
    if soak_jobs:
        steps.append(lambda: run_soak(rows, soak_jobs))
    failed = 0
    for step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001 -- one failed measurement must not lose the others
            failed += 1
            print(f"  (this part failed: {type(error).__name__}: {error})", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
