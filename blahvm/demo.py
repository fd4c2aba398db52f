"""The demo behind the README's first command: a sample grid site, its golden image, its jobs.

    python -m blahvm.demo [--image-dir DIR]

Builds (or reuses) the demo golden image with visible progress, writes a sample site config
whose environments boot that image, and runs the site's jobs: each is routed (different VOs land
in different environments; jobs no rule accepts are rejected with their reason), and each accepted
job runs in a freshly cloned guest that is gone afterwards, with its output, exit code and timings.
Run it as root: it starts guests under the system libvirt.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time

from blahvm.config import load_config
from blahvm.hypervisor.kvm import resolve_domain_type
from blahvm.image import build_demo_image
from blahvm.image.demo import print_progress
from blahvm.lifecycle import run_job
from blahvm.model import Job, Outcome, Rejection, Submission
from blahvm.quantities import Duration, Size
from blahvm.routing.engine import Router

STATE_DIR = "/var/lib/blahvm/demo"

SITE = """\
# A sample grid site: users submit to the routing queue 'grid'; cms and atlas jobs run in
# guests of their own environment, cloned from the demo golden image.
hypervisor: {{uri: "qemu:///system", pool: blahvm-demo, pool_path: {state}/clones, domain_type: {domain_type}}}
host: {{max_guests: 2, memory: 2GiB, vcpus: 2, state_dir: {state}, run_dir: /run/blahvm-demo}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{user: "^(?P<vo>[a-z]+)[0-9]{{3}}$"}}
environments:
{environments}
queues:
  grid: {{}}
  short: {{max_walltime: 10h, slots_per_host: 2}}
  long: {{max_walltime: 72h, slots_per_host: 1}}
routes:
  - {{name: cms-short, when: {{queue: grid, vo: cms, walltime: "<= 10h"}}, queue: short, environment: cms-el}}
  - {{name: atlas, when: {{queue: grid, vo: atlas}}, queue: long, environment: atlas-el}}
  - {{name: nobody-else, reject: "no execution environment is offered to this VO"}}
"""

# (label, submission, what the job runs)
JOBS = (
    ("cms analysis", Submission(queue="grid", user="cms001", walltime=Duration.parse("2h"), name="ana"),
     ["sh", "-c", 'echo "analysing on $(uname -sr) as uid $(id -u)"; echo "events: 42"']),
    ("atlas simulation", Submission(queue="grid", user="atlas042", walltime=Duration.parse("30h"),
                                    memory=Size.parse("256MiB"), name="sim"),
     ["sh", "-c", 'echo "simulating in $(cat /proc/meminfo | head -1)"; echo "failed on purpose" >&2; exit 3']),
    ("atlas job longer than any queue", Submission(queue="grid", user="atlas007", walltime=Duration.parse("100h")),
     ["true"]),
    ("dteam test job", Submission(queue="grid", user="dteam007", name="probe"), ["true"]),
)


def write_site(directory: str, image) -> str:
    entries = []
    for name in ("cms-el", "atlas-el"):
        entry = image.environment_yaml(name)
        entries.append("".join(f"  {line}\n" for line in entry.splitlines()))
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        stream.write(SITE.format(state=directory, domain_type=resolve_domain_type("auto"),
                                 environments="".join(entries).rstrip("\n")))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blahvm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--image-dir", help="where the demo image is built and cached")
    parser.add_argument("--state-dir", default=STATE_DIR, help=f"the demo site's config, ledger and clones "
                                                               f"(default {STATE_DIR})")
    args = parser.parse_args(argv)
    print("== the demo golden image (built once, then reused)", file=sys.stderr)
    image = build_demo_image(args.image_dir, progress=print_progress)
    os.makedirs(args.state_dir, mode=0o755, exist_ok=True)
    config = load_config(write_site(args.state_dir, image))
    print(f"\n== the sample site: {config.source}")
    print("   (the demo host has no grid pool accounts: jobs run as nobody inside their guests)")
    nobody = pwd.getpwnam("nobody")
    router = Router(config)
    for number, (label, submission, argv) in enumerate(JOBS, start=1):
        start = time.perf_counter()
        result = router.route(submission)
        took = (time.perf_counter() - start) * 1e6
        print(f"\n-- job {number}: {label} (user {submission.user}, walltime {submission.walltime or 'default'})")
        if isinstance(result, Rejection):
            print(f"   rejected in {took:.0f} µs: {result.reason}")
            continue
        print(f"   routed in {took:.0f} µs by rule {result.rule}: vo {result.vo} -> queue {result.queue}, "
              f"environment {result.environment}, {result.memory} x {result.vcpus} vcpu")
        print(f"   $ {' '.join(argv)}", flush=True)
        job = Job(job_id=f"demo-{os.getpid()}-{number}", user=submission.user, decision=result,
                  uid=nobody.pw_uid, gid=nobody.pw_gid, name=submission.name)
        timings = []
        ran = run_job(config, job, argv, report=lambda step, seconds, detail: timings.append(f"{step} {seconds:.2f}s"))
        sys.stdout.flush()
        outcome = f"exit code {ran.exit_code}" if ran.outcome is Outcome.OK else f"did not run: {ran.message}"
        print(f"   {outcome}; " + ", ".join(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
