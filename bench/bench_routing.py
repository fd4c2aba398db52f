"""Routing speed: decisions per second in process, and one decision from a cold start.

    .venv/bin/python bench/bench_routing.py [--runs N]

Prints figures and ratios measured side by side in this run; asserts nothing.
Targets: >= 100,000 decisions/s at 100 routes; cold start <= 2.5x `python -c pass`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from blahvm.config import parse_config
from blahvm.model import Submission
from blahvm.quantities import Duration
from blahvm.routing.engine import Router

WALLTIMES = ("< 2h", "< 10h", "<= 72h")


def site_yaml(routes: int) -> str:
    lines = [
        "environments:",
        "  e0: {image: /images/e0.qcow2, flavour: kvm, memory: 2GiB, vcpus: 2}",
        "  e1: {image: /images/e1.qcow2, flavour: xen-pv, memory: 1GiB, vcpus: 1}",
        "queues: {grid: {}, short: {max_walltime: 10h}, long: {max_walltime: 72h}}",
        "vo_mapping:",
        '  - {user: "^(?P<vo>[a-z]+[0-9]*)_[0-9]{3}$"}',
        "routes:",
    ]
    for i in range(routes - 1):
        lines.append(f"  - {{name: r{i}, when: {{queue: grid, vo: vo{i // 3}, walltime: '{WALLTIMES[i % 3]}'}}, "
                     f"queue: {'short' if i % 3 < 2 else 'long'}, environment: e{i % 2}}}")
    lines.append("  - {name: nobody, reject: no environment for this VO}")
    return "\n".join(lines) + "\n"


def submissions(routes: int, count: int) -> list:
    rng = random.Random(routes)
    vos = max(1, (routes - 1) // 3)
    return [
        Submission(queue="grid", user=f"vo{rng.randrange(vos + vos // 10 + 1)}_{rng.randrange(1000):03d}",
                   walltime=Duration(rng.choice((1800, 7200, 30000, 200000))))
        for _ in range(count)
    ]


def decisions_per_second(routes: int) -> float:
    router = Router(parse_config(site_yaml(routes)))
    subs = submissions(routes, 20000)
    start = time.perf_counter()
    for submission in subs:
        router.route(submission)
    return len(subs) / (time.perf_counter() - start)


def median_seconds(argv: list, runs: int, env: dict) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold_start(runs: int) -> list:
    work = tempfile.mkdtemp(prefix="blahvm-bench-")
    try:
        config = os.path.join(work, "site.yaml")
        with open(config, "w") as stream:
            stream.write(site_yaml(100))
        blahvm = os.path.join(os.path.dirname(sys.executable), "blahvm")
        route = [blahvm, "route", "--config", config, "--user", "vo7_001", "--queue", "grid", "--walltime", "3h"]
        env = dict(os.environ, BLAHVM_CACHE_DIR=os.path.join(work, "cache"))
        # what a submission hook does: load the table for the installed config, decide, print
        hook = [sys.executable, "-c", "import sys; from blahvm.routing.fast import load_table; "
                f"print(load_table({config!r}, sys.argv[1]).decide(('grid', None, 'vo7_001', None, None, 10800, "
                "None, None, None)))"]
        cache = os.path.join(work, "cache")
        subprocess.run(hook + [cache], check=True, stdout=subprocess.DEVNULL, env=env)  # fills the cache
        bare = median_seconds([sys.executable, "-c", "pass"], runs, env)
        rows = [("python -c pass", bare)]
        rows.append(("submission-hook path, table cached", median_seconds(hook + [cache], runs, env)))
        rows.append(("submission-hook path, full config load", median_seconds(hook + [""], max(3, runs // 3), env)))
        rows.append(("blahvm route (CLI), table cached", median_seconds(route, runs, env)))
        return [(label, seconds, seconds / bare) for label, seconds in rows]
    finally:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="cold starts per command (median)")
    args = parser.parse_args()
    print("routing decisions per second, in process (target >= 100,000 at 100 routes)")
    for routes in (10, 100, 1000):
        print(f"  {routes:>5} routes  {decisions_per_second(routes):>10,.0f} /s")
    print("one routing decision from a cold start, median wall time (target <= 2.5x python -c pass)")
    for label, seconds, ratio in cold_start(args.runs):
        print(f"  {label:<40} {seconds * 1000:7.1f} ms  {ratio:4.2f}x")


if __name__ == "__main__":
    main()
