"""docs/api.md: every name it calls public is importable from blahvm, and its worked example runs.

The example's hooks run against a config written here, on libvirt's in-process test:///default
driver: route, prepare (not waiting for an agent), launch (which fails: test:/// guests have no
agent), capacity, teardown, reap, and the CI check.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re

import pytest

import blahvm

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")
TEST_URI = "test:///default"
MiB = 1024**2


def section(title: str) -> str:
    with open(DOC, encoding="utf-8") as stream:
        text = stream.read()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def public_names() -> list:
    """The backquoted names in the first column of the table under "What is public"."""
    names = []
    for line in section("What is public").splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line.split("|")[1])
    return names


def example_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", section("Worked example"), re.S)


def test_every_name_the_doc_lists_is_public_and_every_public_name_is_listed():
    listed = public_names()
    assert len(listed) == len(set(listed)) and len(listed) > 20
    for name in listed:
        assert getattr(blahvm, name) is not None, name
    assert set(listed) == set(blahvm.__all__) - {"__version__"}


def test_the_worked_example_is_plain_python_that_imports_nothing_internal():
    blocks = example_blocks()
    assert len(blocks) == 7
    source = "\n".join(blocks)
    compile(source, "docs/api.md", "exec")
    assert not re.search(r"^\s*(from|import) blahvm\.", source, re.M)


# -- running the worked example -----------------------------------------------------------------


@pytest.fixture
def site(tmp_path):
    image = tmp_path / "golden.raw"
    image.write_bytes(b"\0" * MiB)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    path = tmp_path / "site.yaml"
    path.write_text(f"""\
hypervisor: {{uri: "{TEST_URI}", pool: blahvm-api-{abs(hash(str(tmp_path))) % 10**8}, pool_path: {tmp_path}/clones, domain_type: qemu}}
host: {{max_guests: 2, memory: 1GiB, vcpus: 4, state_dir: {tmp_path}/state, run_dir: {tmp_path}/run}}
defaults: {{walltime: 1h, cores: 1}}
environments:
  demo: {{image: {image}, sha256: {sha}, flavour: kvm, memory: 256MiB, vcpus: 1}}
queues:
  grid: {{}}
  short: {{max_walltime: 10h, slots_per_host: 2}}
routes:
  - name: short
    when: {{queue: grid, walltime: "<= 10h"}}
    queue: short
    environment: demo
""")
    return str(path)


@pytest.fixture
def example(site):
    namespace = {"__name__": "qsys_blahvm"}
    exec(compile("\n".join(example_blocks()), "docs/api.md", "exec"), namespace)
    assert namespace["CONFIG"] == "/etc/blahvm/site.yaml"
    namespace["CONFIG"] = site  # what an install would fix
    return namespace


ME = pwd.getpwuid(os.getuid()).pw_name
SUBMITTED = {"owner": ME, "queue": "grid", "walltime": "2:00:00", "mem": "128M", "ncpus": "1", "name": "a job"}
ON_HOST = {**SUBMITTED, "queue": "short", "submitted_queue": "grid"}  # as Qsys gives it to the prologue


def test_submit_filter_routes_and_refuses_with_one_line(example, capsys):
    assert example["submit_filter"](SUBMITTED) == 0
    assert capsys.readouterr().out == "queue=short\n"
    assert example["submit_filter"]({**SUBMITTED, "walltime": "20h"}) == 1
    err = capsys.readouterr().err
    assert err.startswith("qsub: no route accepts this job (queue=grid ") and err.count("\n") == 1
    assert example["submit_filter"]({**SUBMITTED, "mem": "lots"}) == 1
    assert capsys.readouterr().err.startswith("qsub: size 'lots'")


def test_execution_host_refuses_a_job_the_rules_put_elsewhere(example, capsys):
    config = blahvm.load_config(example["CONFIG"])
    job = example["execution_job"](config, "7.qsys", ON_HOST)
    assert isinstance(job, blahvm.Job) and job.decision.queue == "short" and job.uid == os.getuid()
    moved = example["execution_job"](config, "7.qsys", {**ON_HOST, "queue": "grid"})
    assert isinstance(moved, blahvm.Rejection) and "not grid" in moved.reason
    assert example["prologue"]("7.qsys", {**ON_HOST, "queue": "grid"}, ready_timeout=None) == 1
    assert example["job_starter"]("7.qsys", {**ON_HOST, "owner": "no-such-user-here"}, ["/bin/true"]) == 255


def test_prologue_job_starter_epilogue_probe_and_clean_up(example, keep_driver, capfd):
    from blahvm.hypervisor import guests

    state_dir = blahvm.load_config(example["CONFIG"]).host.state_dir

    def ours():  # the test driver is shared by the whole process: count only this site's guests
        return [g.name for g in guests.list_blahvm_guests(keep_driver) if g.metadata.ledger == state_dir]

    assert example["load_probe"]() == {"slots": 2, "environments": ("demo",)}
    assert example["prologue"]("7.qsys", ON_HOST, ready_timeout=None) == 0
    assert "guest started" in capfd.readouterr().err
    assert example["prologue"]("7.qsys", ON_HOST, ready_timeout=None) == 0  # idempotent: the same guest
    assert "reused" in capfd.readouterr().err
    assert len(ours()) == 1
    assert example["load_probe"]() == {"slots": 1, "environments": ("demo",)}

    # test:/// guests have no agent: the payload never runs, and the job starter says so in one line
    assert example["job_starter"]("7.qsys", ON_HOST, ["/bin/true"]) == blahvm.LAUNCH_FAILED
    err = capfd.readouterr().err
    assert err.startswith("blahvm: job 7.qsys could not run in its guest") and err.count("\n") == 1

    assert example["epilogue"]("7.qsys") == 0
    assert "removed its guest" in capfd.readouterr().err
    assert example["epilogue"]("7.qsys") == 0  # idempotent: nothing left is fine
    assert "already gone" in capfd.readouterr().err
    assert ours() == []
    assert os.listdir(blahvm.load_config(example["CONFIG"]).host.run_dir) == []
    assert example["clean_up"]() == 0
    assert capfd.readouterr().err.startswith("reap removed 0 guests, 0 volumes, 0 run dirs")
    assert example["load_probe"]() == {"slots": 2, "environments": ("demo",)}


def test_ci_check(example, site, tmp_path):
    assert example["check_site"](site, SUBMITTED, "short") == []
    explained = example["check_site"](site, {**SUBMITTED, "walltime": "20h"}, "short")
    assert explained[0].startswith("short: ") and explained[-1].startswith("wanted short, rejected: no route accepts")
    broken = tmp_path / "broken.yaml"
    broken.write_text("host: {max_guests: 0}\n")
    (problem,) = example["check_site"](str(broken), SUBMITTED, "short")
    assert problem.startswith(f"{broken}:1: host.max_guests: ")
