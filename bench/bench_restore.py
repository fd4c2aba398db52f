"""A job's guest started from a saved post-boot state against a cold boot of the same environment.

    python bench/bench_restore.py [--runs 3]

Needs root and the demo image (built on first use). Prints; asserts nothing.

One template is made (``templates.make``: a boot that runs no job, saved once its agent answers);
then, alternating run by run, ``prepare`` of the same environment with ``start: auto`` (restored)
and with ``start: boot`` (booted), each until the job's guest is bound and its sockets handed over,
each followed by ``teardown``. The environment has a kernel and initrd of its own copy, so guests
of other work on the host never share the file libvirt relabels at each start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid

import attrs

from blahvm.hypervisor.connection import open_connection
from blahvm.hypervisor.images import verify_image
from blahvm.image import build_demo_image
from blahvm.image.demo import DEFAULT_DEST
from blahvm.lifecycle import prepare, reap, teardown, templates
from blahvm.model import Decision, HostConfig, HypervisorConfig, Job, Outcome, SiteConfig
from blahvm.services import ensure_libvirt

URI = "qemu:///system"
READY_TIMEOUT = 180.0


def measure(runs: int, image_dir: str = DEFAULT_DEST) -> dict:
    """{'restore': [s...], 'boot': [s...], 'make': s, 'state_bytes': n, 'disk_bytes': n}"""
    ensure_libvirt(URI, timeout=90)
    demo = build_demo_image(image_dir)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="bench-restore-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)
    env = demo.environment("demo")
    boot_files = {}
    for what in ("kernel", "initrd"):
        boot_files[what] = os.path.join(where, what)
        shutil.copyfile(getattr(env, what), boot_files[what])
        os.chmod(boot_files[what], 0o444)
    env = attrs.evolve(env, start="auto", **boot_files)
    pool = f"blahvm-bench-{uuid.uuid4().hex[:8]}"
    config = SiteConfig(
        hypervisor=HypervisorConfig(uri=URI, pool=pool, pool_path=os.path.join(where, "clones"), domain_type="qemu",
                                    timeout=60),
        host=HostConfig(max_guests=2, state_dir=os.path.join(where, "state"), run_dir=os.path.join(where, "run")),
        environments={"auto": env, "boot": attrs.evolve(env, name="boot", start="boot")},
    )
    figures = {"restore": [], "boot": []}
    try:
        golden = verify_image(env.name, env.image, env.sha256, config.host.state_dir)
        with open_connection(URI, timeout=60) as conn:
            made = templates.make(config, conn, env, golden, templates.Shape(env.memory, env.vcpus))
        figures.update(make=made.seconds, state_bytes=made.template.state_size, disk_bytes=made.template.disk_size)
        for _ in range(runs):
            for start in ("restore", "boot"):
                name = "auto" if start == "restore" else "boot"
                decision = Decision(queue="q", environment=name, rule="r", vo="bench", memory=env.memory,
                                    vcpus=env.vcpus)
                job = Job(job_id=f"br-{uuid.uuid4().hex[:8]}", user="nobody", decision=decision, uid=65534, gid=65534)
                started = time.perf_counter()
                result = prepare(config, job, ready_timeout=READY_TIMEOUT)
                seconds = time.perf_counter() - started
                teardown(config, job.job_id)
                if result.outcome is not Outcome.OK or (start in dict(result.timings)) is False:
                    raise SystemExit(f"bench: {start}: {result.message}")
                figures[start].append(seconds)
    finally:
        reap(config)
        with open_connection(URI, timeout=30) as conn:
            try:
                raw = conn.raw.storagePoolLookupByName(pool)
                raw.destroy()
                raw.undefine()
            except Exception:  # noqa: BLE001 -- the pool may never have been made
                pass
        shutil.rmtree(where, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-dir", default=DEFAULT_DEST)
    args = parser.parse_args()
    figures = measure(args.runs, args.image_dir)
    restore, boot = statistics.median(figures["restore"]), statistics.median(figures["boot"])
    print(f"template made in {figures['make'] * 1000:,.0f} ms: state {figures['state_bytes'] / 2**20:.1f} MiB, "
          f"disk {figures['disk_bytes'] / 2**20:.1f} MiB")
    print(f"prepare to running, restored: {restore * 1000:,.0f} ms "
          f"({', '.join(f'{s * 1000:,.0f}' for s in figures['restore'])})")
    print(f"prepare to running, booted:   {boot * 1000:,.0f} ms "
          f"({', '.join(f'{s * 1000:,.0f}' for s in figures['boot'])})")
    print(f"ratio restored / booted: {restore / boot:.2f}x")


if __name__ == "__main__":
    main()
