"""The execution-host commands as an admin runs them: real processes, a real ledger, exit codes that mean things.

libvirt's test:///default driver keeps its guests per process, so there a guest made by one command is
gone for the next: those tests check what the ledger keeps. One test boots real guests on qemu:///system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest
import yaml

from blahvm.cli.outcomes import EXIT_BAD_INPUT, EXIT_FAIL_JOB, EXIT_REJECTED, EXIT_RETRY_ELSEWHERE
from blahvm.config import load_config

pytest.importorskip("libvirt")

from tests.test_lifecycle import settle_templates  # noqa: E402

DOWN_URI = "qemu:///system?socket=/nonexistent/libvirt-sock"


def blahvm(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAHVM_")}
    env["BLAHVM_CACHE_DIR"] = "/nonexistent/blahvm-cache"
    return subprocess.run([sys.executable, "-m", "blahvm.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def write_config(where, environment, uri="test:///default", pool="blahvm", pool_path="/var/lib/blahvm/test-clones",
                 max_guests=2, memory="1GiB", vcpus=4):
    config = {
        "hypervisor": {"uri": uri, "pool": pool, "pool_path": pool_path, "domain_type": "qemu", "timeout": "60s"},
        "host": {"max_guests": max_guests, "state_dir": os.path.join(where, "state"),
                 "run_dir": os.path.join(where, "run")},
        "environments": {"demo": environment},
        "queues": {"short": {}},
        "routes": [{"name": "cms", "when": {"vo": "cms"}, "queue": "short", "environment": "demo"},
                   {"name": "others", "reject": "no environment for this VO"}],
    }
    if memory:
        config["host"]["memory"] = memory
    if vcpus:
        config["host"]["vcpus"] = vcpus
    os.makedirs(where, exist_ok=True)
    path = os.path.join(where, "site.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    return path


@pytest.fixture
def golden_env(tmp_path):
    path = tmp_path / "golden.raw"
    path.write_bytes(b"\0" * 1024**2)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"image": str(path), "sha256": sha, "flavour": "kvm", "memory": "256MiB", "vcpus": 1}


@pytest.fixture
def site(tmp_path, golden_env):
    return write_config(str(tmp_path), golden_env)


def as_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def prepare(config, job_id, *more):
    return blahvm("prepare", "--config", config, "--job-id", job_id, "--user", "nobody", "--vo", "cms", *more)


# -- test:///default: what the ledger keeps --------------------------------------------------------


def test_prepare_records_the_job_and_teardown_frees_its_slot(site):
    made = prepare(site, "1.srv", "--no-wait")
    assert made.returncode == 0, made.stderr
    assert made.stdout == ""
    steps = made.stderr.splitlines()
    assert steps[0] == "blahvm: job 1.srv: route cms: queue short, environment demo, memory 256MiB, vcpus 1 " + \
        steps[0].rsplit(" ", 1)[1]
    assert [line.split(" (")[0] for line in steps[1:3]] == ["blahvm: job 1.srv: clone", "blahvm: job 1.srv: boot"]
    assert "guest started" in steps[-1] and steps[-1].endswith("s)")

    # This process's test driver never saw that guest: the entry is what reap would close.
    (row,) = as_json(blahvm("guests", "--config", site, "--json"))["guests"]
    assert row["job_id"] == "1.srv" and row["user"] == "nobody" and row["vo"] == "cms"
    assert (row["environment"], row["ledger_state"], row["libvirt_state"], row["slot"]) == \
        ("demo", "running", "absent", 0)
    assert set(row["timings"]) == {"clone", "boot"} and row["flag"].startswith("no guest")
    table = blahvm("guests", "--config", site).stdout.splitlines()
    assert table[0].split() == ["JOB", "USER", "VO", "ENVIRONMENT", "LEDGER", "LIBVIRT", "SLOT", "AGE", "TIMINGS",
                                "FLAG"]
    assert table[1].startswith("1.srv") and "no guest: reap closes it" in table[1]

    assert as_json(blahvm("capacity", "--config", site, "--json")) == {
        "guests_free": 1, "guests_total": 2, "memory_free": "768MiB", "memory_total": "1GiB",
        "vcpus_free": 3, "vcpus_total": 4, "environments": ["demo"], "queue_slots_free": {},
    }
    done = blahvm("teardown", "--config", site, "--job-id", "1.srv")
    assert done.returncode == 0 and done.stdout == "" and done.stderr.startswith("blahvm: job 1.srv:")
    assert as_json(blahvm("guests", "--config", site, "--json"))["guests"] == []
    assert as_json(blahvm("capacity", "--config", site, "--json"))["guests_free"] == 2
    again = blahvm("teardown", "--config", site, "--job-id", "1.srv")  # nothing left is fine
    assert again.returncode == 0, again.stderr


def test_capacity_text_and_a_full_host(tmp_path, golden_env):
    config = write_config(str(tmp_path), golden_env, max_guests=1, memory=None, vcpus=None)
    assert prepare(config, "1.srv", "--no-wait").returncode == 0
    assert blahvm("capacity", "--config", config).stdout.splitlines() == [
        "guests  0 free of 1", "memory  unlimited", "vcpus   unlimited", "fits now: none",
    ]
    full = prepare(config, "2.srv", "--no-wait")
    assert full.returncode == EXIT_RETRY_ELSEWHERE, full.stderr


def test_reap_dry_run_then_reap_closes_the_dead_entry(site):
    assert prepare(site, "1.srv", "--no-wait").returncode == 0
    dry = blahvm("reap", "--config", site, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "would close entry 1.srv"
    assert dry.stderr.startswith("blahvm: reap would remove 0 guests")
    assert as_json(blahvm("guests", "--config", site, "--json"))["guests"][0]["job_id"] == "1.srv"
    done = as_json(blahvm("reap", "--config", site, "--json"))
    assert done["dry_run"] is False and done["entries"] == ["1.srv"]
    assert as_json(blahvm("guests", "--config", site, "--json"))["guests"] == []
    assert as_json(blahvm("reap", "--config", site, "--json"))["entries"] == []


def test_reap_counts_what_closing_an_entry_removed(site, tmp_path):
    assert prepare(site, "1.srv", "--no-wait").returncode == 0
    (run_dir,) = [str(path) for path in (tmp_path / "run").iterdir()]
    dry = blahvm("reap", "--config", site, "--dry-run")
    assert dry.stdout.splitlines() == ["would close entry 1.srv", f"would remove run dir {run_dir}"]
    done = blahvm("reap", "--config", site)
    assert done.stdout.splitlines() == ["closed entry 1.srv", f"removed run dir {run_dir}"]
    assert done.stderr.startswith("blahvm: reap removed 0 guests, 0 volumes, 1 run dirs; closed 1 entries")
    assert not os.path.exists(run_dir)


def test_guests_without_an_entry_are_flagged(tmp_path, golden_env):
    """A test-driver node file gives every process the same guests: one of ours, one of another host's, one of
    another installation's on this host, and two template makers' of ours, each with its volume and run dir:
    one whose maker lives (this process, by its scratch dir), left alone; one whose maker died, reap's."""
    from blahvm.lifecycle import templates

    live, dead = "0123456789abcdef", "fedcba9876543210"
    state = str(tmp_path / "state")
    os.makedirs(os.path.join(state, "templates",
                             f".making-t-{live}-{os.getpid()}-{templates._start_time(os.getpid())}"))
    for key in (live, dead):  # each maker's run dir
        os.makedirs(tmp_path / "run" / f"blahvm-template-{key}")
    node = tmp_path / "node.xml"
    domains = "".join(
        f"""<domain type="test"><name>{name}</name><memory>262144</memory><vcpu>1</vcpu><os><type>hvm</type></os>
        <metadata><blahvm:job xmlns:blahvm="https://blahvm.org/xmlns/job/1"><blahvm:id>{job}</blahvm:id>
        <blahvm:user>cms001</blahvm:user><blahvm:environment>demo</blahvm:environment><blahvm:host>{host}</blahvm:host>
        <blahvm:created>2024-01-01T00:00:00Z</blahvm:created>{ledger}</blahvm:job></metadata></domain>"""
        for name, job, host, ledger in (
            ("blahvm-7.o-00000001", "7.o", socket.gethostname(), ""),
            ("blahvm-8.x-00000002", "8.x", "elsewhere.example", ""),
            ("blahvm-9.d-00000003", "9.d", socket.gethostname(), "<blahvm:ledger>/var/lib/blahvm-demo</blahvm:ledger>"),
            *((f"blahvm-template-{key}", "template demo", socket.gethostname(),
               f"<blahvm:ledger>{state}</blahvm:ledger>")
              for key in (live, dead))))
    volumes = "".join(  # each maker's volume, in the site's pool
        f"""<volume type="file"><name>blahvm-template-{key}.qcow2</name><capacity>1048576</capacity>
        <allocation>0</allocation><target><path>/var/lib/blahvm/test-clones/blahvm-template-{key}.qcow2</path>
        </target></volume>""" for key in (live, dead))
    pool = f"""<pool type="dir"><name>blahvm</name><uuid>35bb2ad9-388a-cdfe-461a-b8907f6e53fe</uuid>
        <capacity>1073741824</capacity><allocation>0</allocation><available>1073741824</available>
        <target><path>/var/lib/blahvm/test-clones</path></target>{volumes}</pool>"""
    node.write_text(f"<node>{domains}{pool}</node>")
    config = write_config(str(tmp_path), golden_env, uri=f"test://{node}")
    listed = as_json(blahvm("guests", "--config", config, "--json"))["guests"]
    rows = {row["job_id"] or row["template"]: row for row in listed}
    assert [rows[key]["flag"] for key in (live, dead)] == [
        f"making template t-{live}: reap leaves it while its maker lives",
        f"template t-{dead} whose maker died: reap removes it"]
    assert {rows[key]["job_id"] for key in (live, dead)} == {None} and rows["7.o"]["template"] is None
    table = blahvm("guests", "--config", config).stdout
    assert f"making template t-{live}: reap leaves it while its maker lives" in table
    assert rows["7.o"]["flag"] == "no entry: reap removes it" and rows["7.o"]["ledger_state"] is None
    assert rows["7.o"]["libvirt_state"] == "running" and rows["7.o"]["age_seconds"] > 86400
    assert rows["8.x"]["flag"] == "no entry: made by host elsewhere.example, reap leaves it"
    assert rows["9.d"]["flag"] == \
        "no entry: made by another blahvm installation (state dir /var/lib/blahvm-demo), reap leaves it"
    dry = blahvm("reap", "--config", config, "--dry-run")
    assert dry.stdout.splitlines() == ["would remove guest blahvm-7.o-00000001",
                                       f"would remove guest blahvm-template-{dead}",
                                       f"would remove volume blahvm-template-{dead}.qcow2",
                                       f"would remove run dir {tmp_path}/run/blahvm-template-{dead}"]
    leftovers = as_json(blahvm("guests", "--config", config, "--json"))["reap_would_remove"]
    assert leftovers == {"volumes": [f"blahvm-template-{dead}.qcow2"],
                         "run_dirs": [f"{tmp_path}/run/blahvm-template-{dead}"]}
    assert as_json(blahvm("reap", "--config", config, "--json"))["guests"] == \
        ["blahvm-7.o-00000001", f"blahvm-template-{dead}"]


def test_libvirt_down_guests_shows_the_ledger_and_the_rest_retry_elsewhere(tmp_path, golden_env):
    up = write_config(str(tmp_path), golden_env)
    assert prepare(up, "1.srv", "--no-wait").returncode == 0
    down = write_config(str(tmp_path), golden_env, uri=DOWN_URI)  # same state dir, libvirt unreachable
    shown = blahvm("guests", "--config", down)
    assert shown.returncode == 0
    assert shown.stderr.startswith("blahvm: warning: showing the ledger only:") and shown.stderr.count("\n") == 1
    assert shown.stdout.splitlines()[1].split()[:6] == ["1.srv", "nobody", "cms", "demo", "running", "?"]
    assert as_json(blahvm("guests", "--config", down, "--json"))["libvirt_reachable"] is False
    assert blahvm("capacity", "--config", down).returncode == 0  # the ledger alone answers
    for args in (("reap",), ("teardown", "--job-id", "1.srv")):
        result = blahvm(*args, "--config", down)
        assert result.returncode == EXIT_RETRY_ELSEWHERE and result.stderr.count("\n") == 1, result.stderr
    result = prepare(down, "2.srv")
    assert result.returncode == EXIT_RETRY_ELSEWHERE and "unavailable" in result.stderr.splitlines()[-1]


def test_rejection_and_job_failures_have_their_exit_codes(tmp_path, golden_env, site):
    rejected = blahvm("prepare", "--config", site, "--job-id", "1", "--user", "nobody", "--vo", "atlas")
    assert rejected.returncode == EXIT_REJECTED
    assert rejected.stderr == "blahvm: job 1: rejected by route others: no environment for this VO\n"
    bad_image = write_config(str(tmp_path / "other"), dict(golden_env, sha256="0" * 64))
    failed = prepare(bad_image, "2.srv", "--no-wait")
    assert failed.returncode == EXIT_FAIL_JOB and "sha256" in failed.stderr.splitlines()[-1], failed.stderr
    assert as_json(blahvm("capacity", "--config", bad_image, "--json"))["guests_free"] == 2  # no slot kept


@pytest.mark.parametrize("args, message", [
    (("prepare", "--job-id", "1", "--user", "no-such-user-x", "--vo", "cms"), "no such user 'no-such-user-x'"),
    (("prepare", "--job-id", "1", "--user", "nobody", "--memory", "lots"), "size 'lots'"),
    (("prepare", "--job-id", "1", "--user", "nobody", "--cores", "0"), "cores '0'"),
    (("prepare", "--job-id", " ", "--user", "nobody"), "--job-id: must not be empty"),
    (("prepare", "--user", "nobody"), "the following arguments are required: --job-id"),
    (("teardown",), "the following arguments are required: --job-id"),
    (("reap", "--now"), "unrecognized arguments: --now"),
    (("guests", "--config", "/nonexistent/site.yaml"), "cannot read the config"),
])
def test_bad_input_is_one_line_and_exit_2(site, args, message):
    if "--config" not in args:
        args = (args[0], "--config", site, *args[1:])
    result = blahvm(*args)
    assert result.returncode == EXIT_BAD_INPUT
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_help_documents_the_exit_codes():
    for command in ("prepare", "teardown", "reap", "capacity"):
        shown = blahvm(command, "--help").stdout
        assert "75  retry elsewhere" in shown and "76  fail the job" in shown, command


# -- real guests on qemu:///system ----------------------------------------------------------------

READY_TIMEOUT = 300


@contextlib.contextmanager
def real_site(demo_image):
    """A config file on qemu:///system with its own pool, state and run dirs; all removed afterwards."""
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="cli-host-test-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    pool = f"blahvm-test-{uuid.uuid4().hex[:8]}"
    environment = yaml.safe_load(demo_image.environment_yaml("demo"))["demo"]
    config = write_config(where, environment, uri="qemu:///system", pool=pool,
                          pool_path=os.path.join(where, "clones"), memory=None, vcpus=None)
    try:
        yield config
    finally:
        blahvm("reap", "--config", config, timeout=300)
        for command in (["pool-destroy", pool], ["pool-undefine", pool]):
            subprocess.run(["virsh", "-q", "-c", "qemu:///system", *command], capture_output=True, timeout=60)
        shutil.rmtree(where, ignore_errors=True)


def libvirt_guests():
    listed = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
                            capture_output=True, text=True, check=True, timeout=60)
    return set(listed.stdout.split())


def own_guests(config):
    """``guests --json`` rows of this installation's jobs' guests: on a shared libvirtd, the others'
    are listed too (flagged), and another suite's may come and go at any moment. The guest of a
    template being made (the first job booted for want of one) is the site's, and is no job's."""
    rows = as_json(blahvm("guests", "--config", config, "--json"))["guests"]
    for row in rows:  # one ending as we look may be listed, then gone by the time reap looks for its maker
        if row["template"] is not None:
            assert row["flag"] in (f"making template t-{row['template']}: reap leaves it while its maker lives",
                                   f"template t-{row['template']} whose maker died: reap removes it"), row
    return [row for row in rows if "made by another blahvm installation" not in (row["flag"] or "")
            and row["template"] is None]


@pytest.mark.guest
def test_real_guest_prepare_guests_capacity_teardown_and_reap(demo_image):
    with real_site(demo_image) as config:
        job, orphan = f"cli-{uuid.uuid4().hex[:6]}", f"cli-{uuid.uuid4().hex[:6]}"
        try:
            made = blahvm("prepare", "--config", config, "--job-id", job, "--user", "nobody", "--vo", "cms",
                          timeout=READY_TIMEOUT)
            assert made.returncode == 0, made.stderr
            print(made.stderr)
            assert "guest ready" in made.stderr.splitlines()[-1]
            assert [line.split(": ")[2].split(" (")[0] for line in made.stderr.splitlines()[1:4]] == \
                ["clone", "boot", "ready"]
            (row,) = own_guests(config)
            assert (row["job_id"], row["ledger_state"], row["libvirt_state"], row["flag"]) == \
                (job, "running", "running", None)
            assert {"clone", "boot", "ready"} <= set(row["timings"])
            assert as_json(blahvm("capacity", "--config", config, "--json"))["guests_free"] == 1
            done = blahvm("teardown", "--config", config, "--job-id", job, timeout=180)
            assert done.returncode == 0 and "removed its guest" in done.stderr, done.stderr
            assert own_guests(config) == []
            assert row["guest"] not in libvirt_guests()
            assert as_json(blahvm("capacity", "--config", config, "--json"))["guests_free"] == 2

            # An orphan: a live entry whose guest is destroyed behind blahvm's back.
            made = blahvm("prepare", "--config", config, "--job-id", orphan, "--user", "nobody", "--vo", "cms",
                          "--no-wait", timeout=READY_TIMEOUT)
            assert made.returncode == 0, made.stderr
            (row,) = own_guests(config)
            subprocess.run(["virsh", "-q", "-c", "qemu:///system", "destroy", row["guest"]], check=True,
                           capture_output=True, timeout=60)
            dry = as_json(blahvm("reap", "--config", config, "--dry-run", "--json", timeout=180))
            assert dry["entries"] == [orphan] and dry["dry_run"] is True
            assert own_guests(config)[0]["flag"] == \
                "no guest: reap closes it"
            reaped = as_json(blahvm("reap", "--config", config, "--json", timeout=180))
            assert reaped["entries"] == [orphan]
            assert own_guests(config) == []
            assert row["guest"] not in libvirt_guests()
            settle_templates(load_config(config))  # the first job's template, made in the background
            volumes = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "vol-list",
                                      yaml.safe_load(open(config))["hypervisor"]["pool"]],
                                     capture_output=True, text=True, timeout=60)
            assert volumes.stdout.strip() == "", volumes.stdout
        finally:
            for job_id in (job, orphan):
                blahvm("teardown", "--config", config, "--job-id", job_id, timeout=180)
