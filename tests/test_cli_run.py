"""``blahvm run`` and the demo, as an admin runs them: real processes booting real guests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from blahvm.demo import write_site

pytestmark = pytest.mark.guest


def blahvm(*args, **options):
    return subprocess.run([sys.executable, "-m", "blahvm.cli.main", *args], capture_output=True, timeout=300,
                          **options)


def leftovers(name_part: str) -> str:
    """Domains and volumes libvirt still has whose names contain ``name_part``."""
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                             text=True).stdout
    return "\n".join(line for line in domains.splitlines() if name_part in line)


@pytest.fixture(scope="module")
def site(demo_image):
    # QEMU runs as its own user: the clones' directory must be reachable by it (pytest's tmp is not)
    directory = tempfile.mkdtemp(prefix="blahvm-test-run-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    path = write_site(directory, demo_image)
    with open(path) as stream:
        text = stream.read()
    with open(path, "w") as stream:  # a pool of its own, so a demo run elsewhere never collides
        stream.write(text.replace("pool: blahvm-demo", f"pool: blahvm-test-run-{os.getpid()}"))
    yield path
    subprocess.run(["virsh", "-c", "qemu:///system", "pool-destroy", f"blahvm-test-run-{os.getpid()}"],
                   capture_output=True)
    subprocess.run(["virsh", "-c", "qemu:///system", "pool-undefine", f"blahvm-test-run-{os.getpid()}"],
                   capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)


def test_run_gives_the_output_and_the_exit_code_and_leaves_nothing(site):
    result = blahvm("run", "--config", site, "--queue", "grid", "--vo", "cms", "--user", "nobody", "--",
                    "sh", "-c", "cat; echo to-stderr >&2; id -u; exit 7", input=b"from stdin\n")
    assert result.returncode == 7
    assert result.stdout == b"from stdin\n65534\n"
    steps = [line.split()[1] for line in result.stderr.decode().splitlines() if line.startswith("blahvm: ")]
    assert steps == ["decision", "clone", "boot", "ready", "run", "teardown"]
    assert b"to-stderr\n" in result.stderr
    assert leftovers("blahvm-run-") == ""


def test_run_rejected_and_bad_input(site):
    rejected = blahvm("run", "--config", site, "--queue", "grid", "--vo", "dteam", "--", "true")
    assert rejected.returncode == 1
    assert b"rejected: no execution environment is offered to this VO" in rejected.stderr
    assert blahvm("run", "--config", site, "--vo", "cms").returncode == 2
    unknown = blahvm("run", "--config", site, "--user", "no-such-user-here", "--", "true")
    assert unknown.returncode == 2 and b"no such user 'no-such-user-here'" in unknown.stderr


def test_the_demo_runs_its_site(demo_image):
    result = subprocess.run([sys.executable, "-m", "blahvm.demo", "--image-dir", os.path.dirname(demo_image.directory)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    print(out)
    assert "rule cms-short: vo cms -> queue short, environment cms-el" in out
    assert "rule atlas: vo atlas -> queue long, environment atlas-el" in out
    assert "analysing on Linux" in out and "as uid 65534" in out and "exit code 0;" in out
    assert "failed on purpose" in out and "exit code 3;" in out
    assert "rejected in" in out and "walltime 100h exceeds the 3d limit of queue long (route atlas)" in out
    assert "no execution environment is offered to this VO" in out
    assert leftovers("blahvm-demo-") == ""
