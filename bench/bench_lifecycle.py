"""Clone, prepare and teardown times on qemu:///system, and blahvm's own overhead over bare libvirt.

    python bench/bench_lifecycle.py [--runs 3] [--quick-runs 5] [--image-dir /var/lib/blahvm/images/demo]

Needs root and the demo image (built on first use). Prints a table; asserts nothing.

- clone: a qcow2 overlay (``ClonePool.clone_overlay``) on a sparse raw golden of 100 MiB and of 2 GiB,
  and for contrast one full copy of each (``clone_copy``).
- blahvm path: ``prepare`` (clone, define, start, wait for the agent's hello) then ``teardown``.
- bare path: the same made with plain libvirt-python calls: createXML of the overlay, defineXML of
  the same domain XML, create, the same hello over the agent socket, destroy, undefine, delete.
- "no wait" rows: both paths without waiting for the hello, which takes the guest's boot (seconds of
  TCG, with a spread much larger than blahvm's work) out of the comparison.

The two paths alternate run by run, so drift in the host's load hits both alike.
Target: blahvm's overhead at most 10% of the bare path or at most 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid

import attrs

from blahvm.guest import client
from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import libvirt, open_connection
from blahvm.hypervisor.domain import BackingFile, DiskSpec, GuestMetadata, GuestSpec, build_domain_xml, guest_uuid
from blahvm.hypervisor.images import inspect_image
from blahvm.hypervisor.storage import ClonePool, volume_xml
from blahvm.image import build_demo_image
from blahvm.image.demo import DEFAULT_DEST
from blahvm.lifecycle import prepare, teardown
from blahvm.model import Decision, HostConfig, HypervisorConfig, Job, Outcome, SiteConfig
from blahvm.services import ensure_libvirt

URI = "qemu:///system"
MiB = 1024**2
READY_TIMEOUT = 180.0
TARGET_RATIO = 0.10
TARGET_SECONDS = 0.100


def median_ms(samples) -> str:
    return f"{statistics.median(samples) * 1000:9.1f}"


def spread_ms(samples) -> str:
    return f"{min(samples) * 1000:.1f}-{max(samples) * 1000:.1f}"


def clone_times(pool: ClonePool, golden_path: str, runs: int):
    golden = inspect_image("bench", golden_path)
    overlay, copy = [], []
    for n in range(runs):
        name = f"blahvm-bench-clone-{n}.qcow2"
        started = time.perf_counter()
        pool.clone_overlay(golden, name)
        overlay.append(time.perf_counter() - started)
        pool.delete_volume(name)
    name = "blahvm-bench-copy.img"
    started = time.perf_counter()
    pool.clone_copy(golden, name)
    copy.append(time.perf_counter() - started)
    pool.delete_volume(name)
    return overlay, copy


class BarePath:
    """The same guest as prepare makes, through libvirt-python directly (its golden named with
    ``relabel='no'`` as prepare names it: else libvirt chowns the golden to QEMU's user for good, and
    blahvm then refuses it)."""

    def __init__(self, conn, config: SiteConfig, pool_name: str) -> None:
        self.raw = conn.raw
        self.config = config
        self.pool = self.raw.storagePoolLookupByName(pool_name)
        env = config.environments["demo"]
        self.golden = inspect_image("demo", env.image)
        self.env = env

    def run(self, wait: bool) -> float:
        env = self.env
        name = naming.guest_name(f"bare-{uuid.uuid4().hex[:8]}")
        run_dir = os.path.join(self.config.host.run_dir, name)
        sock = os.path.join(run_dir, "agent.0.sock")
        volume = name + ".qcow2"
        metadata = GuestMetadata(
            job_id="bare", user="nobody", environment="demo", host=socket.gethostname(), created=int(time.time())
        )
        started = time.perf_counter()
        os.makedirs(run_dir, mode=0o700)
        vol = self.pool.createXML(volume_xml(volume, self.golden.virtual_size, "qcow2", self.golden), 0)
        spec = GuestSpec(
            name=name, uuid=guest_uuid(name), flavour="kvm", memory=env.memory, vcpus=env.vcpus,
            disks=(DiskSpec(vol.path(), "qcow2", backing=BackingFile(self.golden.path, self.golden.format)),), metadata=metadata, agent_sockets=(sock,),
            kernel=env.kernel, initrd=env.initrd, cmdline=env.cmdline, domain_type="qemu",
        )
        domain = self.raw.defineXMLFlags(build_domain_xml(spec), libvirt().VIR_DOMAIN_DEFINE_VALIDATE)
        domain.create()
        if wait:
            client.wait_ready(sock, READY_TIMEOUT)
        domain.destroy()
        domain.undefine()
        vol.delete(0)
        shutil.rmtree(run_dir)
        return time.perf_counter() - started


class DestroyWatch:
    """Where teardown's time goes: libvirt's destroy+undefine of the guest, timed inside teardown, and
    when the guest's QEMU process actually exited (a zombie or gone, polled in /proc every 2 ms).

    libvirt's destroy returns only once the QEMU pid no longer exists (it polls every 200 ms), and an
    exited QEMU exists until its parent, the host's init (libvirtd daemonizes QEMU), reaps it.
    """

    def __init__(self) -> None:
        self.destroy = 0.0  # seconds in guests.destroy_and_undefine
        self.exited = None  # seconds from the destroy call until QEMU had exited, if seen

    def __enter__(self) -> "DestroyWatch":
        self._original = guests.destroy_and_undefine
        guests.destroy_and_undefine = self._timed
        return self

    def __exit__(self, *_exc) -> None:
        guests.destroy_and_undefine = self._original

    def _timed(self, conn, name: str) -> bool:
        pid = qemu_pid(name)
        started = time.perf_counter()
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(pid, started, stop), daemon=True) if pid else None
        if watcher:
            watcher.start()
        try:
            return self._original(conn, name)
        finally:
            self.destroy += time.perf_counter() - started
            stop.set()
            if watcher:
                watcher.join()

    def _watch(self, pid: int, started: float, stop: threading.Event) -> None:
        while not stop.is_set():
            if process_state(pid) in (None, "Z", "X"):
                self.exited = time.perf_counter() - started
                return
            time.sleep(0.002)
        if process_state(pid) in (None, "Z", "X"):
            self.exited = time.perf_counter() - started


def qemu_pid(guest: str):
    """The guest's QEMU pid from libvirt's pid file (qemu:///system), or None."""
    try:
        with open(f"/run/libvirt/qemu/{guest}.pid") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def process_state(pid: int):
    """The one-letter state of ``pid`` (R, S, Z, ...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def blahvm_run(config: SiteConfig, job_env, wait: bool, breakdown: "dict | None" = None):
    """prepare + teardown of one job; (total seconds, prepare seconds, teardown seconds, phases).
    ``breakdown`` (a dict of lists) gets this teardown's destroy, qemu_exit and rest seconds appended."""
    decision = Decision(queue="q", environment="demo", rule="r", vo="bench", memory=job_env.memory, vcpus=job_env.vcpus)
    job = Job(job_id=f"bench-{uuid.uuid4().hex[:8]}", user="nobody", decision=decision, uid=65534, gid=65534)
    started = time.perf_counter()
    result = prepare(config, job, ready_timeout=READY_TIMEOUT if wait else None)
    prepared = time.perf_counter()
    with DestroyWatch() as watch:
        done = teardown(config, job.job_id)
    ended = time.perf_counter()
    if result.outcome is not Outcome.OK or done.outcome is not Outcome.OK:
        raise SystemExit(f"bench: {result.message}; {done.message}")
    if breakdown is not None:
        breakdown.setdefault("destroy", []).append(watch.destroy)
        if watch.exited is not None:
            breakdown.setdefault("qemu_exit", []).append(watch.exited)
        breakdown.setdefault("rest", []).append(ended - prepared - watch.destroy)
    return ended - started, prepared - started, ended - prepared, dict(result.timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="real boots per path (default 3)")
    parser.add_argument("--quick-runs", type=int, default=5, help="runs per path without waiting (default 5)")
    parser.add_argument("--clone-runs", type=int, default=7, help="overlay clones per golden size (default 7)")
    parser.add_argument("--image-dir", default=DEFAULT_DEST)
    measure(parser.parse_args())


def measure(args, echo: bool = True) -> "Table":
    """Every row of the table (label, samples in seconds); ``args`` as main parses them.

    Keys for other scripts: ``rows.figures`` maps short names (clone_100m, clone_2g, bare, blahvm,
    prepare, teardown, ready, bare_nowait, blahvm_nowait; teardown_destroy, teardown_qemu_exit and
    teardown_rest, each also with _nowait) to their sample lists.
    """
    ensure_libvirt(URI, timeout=90)
    demo = build_demo_image(args.image_dir)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="bench-lifecycle-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    pool_name = f"blahvm-bench-{uuid.uuid4().hex[:8]}"
    config = SiteConfig(
        hypervisor=HypervisorConfig(
            uri=URI, pool=pool_name, pool_path=os.path.join(where, "clones"), domain_type="qemu", timeout=60
        ),
        host=HostConfig(max_guests=2, state_dir=os.path.join(where, "state"), run_dir=os.path.join(where, "run")),
        # a cold boot every time: this bench is blahvm's overhead on a boot (bench_restore.py: the restore)
        environments={"demo": attrs.evolve(demo.environment("demo"), start="boot")},
    )
    rows = Table(echo=echo)
    try:
        with open_connection(URI, timeout=60) as conn:
            pool = ClonePool.ensure(conn, pool_name, config.hypervisor.pool_path)
            goldens = os.path.join(where, "goldens")
            os.makedirs(goldens)
            for label, size in (("100 MiB", 100 * MiB), ("2 GiB", 2048 * MiB)):
                path = os.path.join(goldens, f"golden-{size // MiB}.raw")
                with open(path, "wb") as golden:
                    golden.truncate(size)  # sparse: clone time must not depend on it anyway
                overlay, copy = clone_times(pool, path, args.clone_runs)
                rows.figures[f"clone_{'100m' if size == 100 * MiB else '2g'}"] = overlay
                rows.figures[f"copy_{'100m' if size == 100 * MiB else '2g'}"] = copy
                rows.append((f"clone overlay, {label} golden", overlay))
                rows.append((f"clone full copy, {label} golden (contrast)", copy))

            os.makedirs(config.host.run_dir, mode=0o755, exist_ok=True)
            bare = BarePath(conn, config, pool_name)
            env = config.environments["demo"]
            blahvm_run(config, env, wait=False)  # warm-up: checksum cache, pool, imports
            for wait, runs in ((False, args.quick_runs), (True, args.runs)):
                if runs == 0:
                    continue
                totals, prepares, teardowns, bares, readies = [], [], [], [], []
                breakdown = {}
                for _ in range(runs):
                    bares.append(bare.run(wait))
                    total, prepared, torn, phases = blahvm_run(config, env, wait, breakdown)
                    totals.append(total)
                    prepares.append(prepared)
                    teardowns.append(torn)
                    readies.append(phases.get("ready", 0.0))
                tag = "" if wait else " (no wait)"
                key = "" if wait else "_nowait"
                rows.figures.update({f"bare{key}": bares, f"blahvm{key}": totals, f"prepare{key}": prepares,
                                     f"teardown{key}": teardowns})
                if wait:
                    rows.figures["ready"] = readies
                rows.append((f"bare libvirt: clone+define+start{'+hello' if wait else ''}+destroy+delete{tag}", bares))
                rows.append((f"blahvm: prepare{' to running' if wait else ''}{tag}", prepares))
                rows.append((f"blahvm: teardown{tag}", teardowns))
                for part, what in (("destroy", "libvirt's destroy+undefine"),
                                   ("qemu_exit", "until QEMU had exited (SIGTERM to zombie)"),
                                   ("rest", "everything else (stats, volumes, run dir, share, ledger)")):
                    if breakdown.get(part):
                        rows.figures[f"teardown_{part}{key}"] = breakdown[part]
                        rows.append((f"  of which {what}{tag}", breakdown[part]))
                rows.append((f"blahvm: prepare+teardown{tag}", totals))
                if wait:
                    rows.append(("  of which waiting for the agent's hello", readies))
                overhead = statistics.median(totals) - statistics.median(bares)
                ratio = overhead / statistics.median(bares)
                met = overhead <= TARGET_SECONDS or ratio <= TARGET_RATIO
                rows.append((f"OVERHEAD{tag}: {overhead * 1000:+.1f} ms = {ratio:+.1%} of bare "
                             f"({'meets' if met else 'misses'} the target)", None))
    finally:
        cleanup(config, pool_name, where)
    return rows


class Table(list):
    """Rows printed as soon as they are measured, so a failure later still leaves the figures."""

    WIDTH = 72

    def __init__(self, echo: bool = True) -> None:
        super().__init__()
        self.echo = echo
        self.figures = {}

    def append(self, row) -> None:
        super().append(row)
        if not self.echo:
            return
        if len(self) == 1:
            print(f"{'what':<{self.WIDTH}}  {'runs':>4}  {'median ms':>9}  range ms", flush=True)
        label, samples = row
        if samples is None:
            print(label, flush=True)
        else:
            print(f"{label:<{self.WIDTH}}  {len(samples):>4}  {median_ms(samples)}  {spread_ms(samples)}", flush=True)


def cleanup(config: SiteConfig, pool_name: str, where: str) -> None:
    with contextlib.suppress(Exception), open_connection(URI, timeout=30) as conn:
        for domain in conn.raw.listAllDomains(0):
            if domain.name().startswith(naming.PREFIX) and os.path.exists(
                os.path.join(config.host.run_dir, domain.name())
            ):
                with contextlib.suppress(Exception):
                    domain.destroy()
                with contextlib.suppress(Exception):
                    domain.undefine()
        pool = conn.raw.storagePoolLookupByName(pool_name)
        for volume in pool.listAllVolumes(0):
            volume.delete(0)
        pool.destroy()
        pool.undefine()
    subprocess.run(["rm", "-rf", where], check=False)


if __name__ == "__main__":
    main()
