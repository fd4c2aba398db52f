"""The demo behind the README's first command: a sample grid site, its golden image, its jobs.

    python -m blahvm.demo [--image-dir DIR]

Builds (or reuses) the demo golden image with visible progress, writes a sample site config
whose environments boot that image, and shows how the site's jobs are routed: different VOs
land in different environments, and a job no rule accepts is rejected with its reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from blahvm.config import load_config
from blahvm.image import build_demo_image
from blahvm.image.demo import print_progress
from blahvm.model import Rejection, Submission
from blahvm.quantities import Duration, Size
from blahvm.routing.engine import Router

SITE = """\
# A sample grid site: users submit to the routing queue 'grid'; cms and atlas jobs run in
# guests of their own environment, cloned from the demo golden image.
hypervisor: {{uri: "qemu:///system", pool: blahvm-demo, pool_path: {state}/clones, domain_type: qemu}}
host: {{max_guests: 2, memory: 2GiB, vcpus: 2, state_dir: {state}, run_dir: {state}/run}}
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

JOBS = (
    ("cms analysis", Submission(queue="grid", user="cms001", walltime=Duration.parse("2h"), name="ana")),
    ("atlas simulation", Submission(queue="grid", user="atlas042", walltime=Duration.parse("30h"),
                                    memory=Size.parse("256MiB"), name="sim")),
    ("cms job that is too long", Submission(queue="grid", user="cms002", walltime=Duration.parse("20h"))),
    ("dteam test job", Submission(queue="grid", user="dteam007", name="probe")),
)


def write_site(directory: str, image) -> str:
    entries = []
    for name in ("cms-el", "atlas-el"):
        entry = image.environment_yaml(name)
        entries.append("".join(f"  {line}\n" for line in entry.splitlines()))
    path = os.path.join(directory, "site.yaml")
    with open(path, "w") as stream:
        stream.write(SITE.format(state=directory, environments="".join(entries).rstrip("\n")))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blahvm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--image-dir", help="where the demo image is built and cached")
    args = parser.parse_args(argv)
    print("== the demo golden image (built once, then reused)", file=sys.stderr)
    image = build_demo_image(args.image_dir, progress=print_progress)
    work = tempfile.mkdtemp(prefix="blahvm-demo-")
    config = load_config(write_site(work, image))
    print(f"\n== the sample site: {config.source}")
    router = Router(config)
    for label, submission in JOBS:
        start = time.perf_counter()
        result = router.route(submission)
        took = (time.perf_counter() - start) * 1e6
        asked = f"user {submission.user}, walltime {submission.walltime or 'default'}"
        if isinstance(result, Rejection):
            print(f"{label:<26} ({asked}): rejected: {result.reason}  [{took:.0f} µs]")
        else:
            print(f"{label:<26} ({asked}): vo {result.vo} -> queue {result.queue}, environment "
                  f"{result.environment}, {result.memory} x {result.vcpus} vcpu (rule {result.rule})  [{took:.0f} µs]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
