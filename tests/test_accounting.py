"""blahvm's own accounting (what each guest used, in the ledger) and suspend/resume of a job's guest.

Logic on plain values and libvirt's in-process test:///default driver; one real guest proves the
figures come from the guest's work and that a paused guest's payload makes no progress.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from blahvm.cli.accounting import parse_since
from blahvm.hypervisor.stats import DomainUsage, usage_of
from blahvm.ledger import Consumed, Ledger, State, database
from blahvm.ledger.entries import Entry
from blahvm.lifecycle import accounting, follow, prepare, resume, suspend, teardown
from blahvm.lifecycle.accounting import GONE, record_of
from blahvm.lifecycle.apel import HEADER, ApelSite, apel_message
from blahvm.lifecycle.follow import stopped_state
from blahvm.model import HostConfig, Outcome
from blahvm.quantities import Size
from tests.test_cli_host import blahvm, prepare as cli_prepare, site  # noqa: F401  (site: a fixture)
from tests.test_cli_host import golden_env  # noqa: F401  (fixture)
from tests.test_lifecycle import make_config, make_job, real_job, real_site, READY_TIMEOUT

MiB = 1024**2

# -- the ledger --------------------------------------------------------------------------------------


def test_a_version_2_ledger_is_migrated_and_keeps_its_entries(tmp_path):
    path = str(tmp_path / "state" / database.FILENAME)
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path, isolation_level=None)
    for version in (0, 1):  # exactly what a blahvm of schema 2 made
        database.MIGRATIONS[version](db)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO entries (job_id, slot, state, user, vo, environment, memory, vcpus, steps, created,"
               " updated, closed, outcome, version) VALUES ('old.1', 0, 'closed', 'u', 'cms', 'demo', 1, 1,"
               " '[[\"reserved\", 10.0], [\"closed\", 20.0]]', 10.0, 20.0, 20.0, 'ok', 1)")
    db.close()
    with Ledger(HostConfig(state_dir=str(tmp_path / "state"))) as ledger:
        (old,) = ledger.closed_since(0)
        assert old.job_id == "old.1" and old.consumed == Consumed()
        assert ledger.record_usage("old.1", Consumed(cpu_seconds=1.5, disk_write=7))
        assert ledger.get("old.1").consumed == Consumed(cpu_seconds=1.5, disk_write=7)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION == 4


def test_usage_is_recorded_on_the_latest_run_and_closed_runs_are_listed_since_a_time(tmp_path):
    now = [1000.0]
    with Ledger(HostConfig(state_dir=str(tmp_path)), clock=lambda: now[0]) as ledger:
        assert not ledger.record_usage("nobody.1", Consumed(cpu_seconds=1.0))
        for job in ("a", "b"):
            ledger.reserve(job, "u", None, "demo", MiB, 1)
            used = Consumed(cpu_seconds=2.0, vcpu_seconds=1.5, max_memory=Size(300 * MiB), disk_read=1, disk_write=2)
            assert ledger.record_usage(job, used)
            ledger.close(job, Outcome.OK)
            now[0] += 100
        assert [e.job_id for e in ledger.closed_since(1000.0)] == ["a", "b"]
        assert [e.job_id for e in ledger.closed_since(1050.0)] == ["b"]
        assert ledger.get("a").consumed.max_memory == 300 * MiB
        with pytest.raises(ValueError, match="cpu_seconds"):
            ledger.record_usage("a", Consumed(cpu_seconds=-1.0))
        with pytest.raises(ValueError, match="usage must be a Consumed"):
            ledger.record_usage("a", {"cpu_seconds": 1})


# -- pure pieces -------------------------------------------------------------------------------------


def test_usage_is_read_from_libvirts_statistics():
    stats = {"state.state": 1, "cpu.time": 7_265_367_000, "balloon.rss": 290468, "vcpu.current": 2,
             "vcpu.0.time": 6_000_000_000, "vcpu.0.wait": 5, "vcpu.1.time": 500_000_000, "block.count": 2,
             "block.0.rd.bytes": 100, "block.0.wr.bytes": 10, "block.1.rd.bytes": 1, "block.1.wr.bytes": 2}
    assert usage_of(stats) == DomainUsage(cpu_seconds=pytest.approx(7.265367), vcpu_seconds=pytest.approx(6.5),
                                          memory_bytes=290468 * 1024, disk_read_bytes=101, disk_write_bytes=12)
    assert usage_of({"state.state": 5}) is None  # a stopped domain has no CPU time...
    assert usage_of({"state.state": 5, "cpu.time": 14_930_000_000}) is None  # ...whatever libvirt says (its own)


def entry(steps, **fields):
    return Entry(id=1, job_id="7", slot=0, state=State.CLOSED, user="u", vo="cms", environment="demo",
                 memory=Size(MiB), vcpus=1, steps=tuple((State(s), t) for s, t in steps), created=steps[0][1],
                 closed=steps[-1][1], **fields)


def test_provisioning_is_until_the_guest_runs_and_wall_from_then_until_teardown():
    ran = record_of(entry([("reserved", 100.0), ("cloning", 100.5), ("booting", 101.0), ("running", 106.0),
                           ("tearing_down", 166.0), ("closed", 168.0)],
                          consumed=Consumed(cpu_seconds=9.0, note=None)))
    assert (ran.provision_seconds, ran.wall_seconds, ran.cpu_seconds) == (6.0, 60.0, 9.0)
    never = record_of(entry([("reserved", 100.0), ("booting", 101.0), ("tearing_down", 130.0), ("closed", 131.0)]))
    assert (never.provision_seconds, never.wall_seconds, never.cpu_seconds) == (30.0, 0.0, None)


SITE = ApelSite(site="EXAMPLE-SITE", submit_host="ce01.example.org:9619/blah-slurm-grid", machine="wn1.example.org",
                hepspec=12.5)


def test_an_apel_message_carries_the_guests_cpu_and_the_slots_wall_time():
    ran = record_of(entry([("reserved", 1000.0), ("running", 1006.0), ("tearing_down", 1066.4), ("closed", 1068.0)],
                          consumed=Consumed(cpu_seconds=59.6, max_memory=Size(300 * MiB)), queue="grid"))
    lost = record_of(entry([("reserved", 1000.0), ("tearing_down", 1010.0), ("closed", 1011.0)]))
    message, skipped = apel_message([ran, lost], SITE)
    assert skipped == 1  # no CPU time: left out rather than reported as an idle job
    assert message == "\n".join([
        HEADER, "Site: EXAMPLE-SITE", "SubmitHost: ce01.example.org:9619/blah-slurm-grid",
        "MachineName: wn1.example.org", "Queue: grid", "LocalJobId: 7", "LocalUserId: u", "VO: cms",
        "WallDuration: 66", "CpuDuration: 60", "Processors: 1", "NodeCount: 1", "StartTime: 1000", "EndTime: 1068",
        "InfrastructureType: grid", "MemoryReal: 307200", "ServiceLevelType: HEPSPEC", "ServiceLevel: 12.5",
        "%%"]) + "\n"
    assert apel_message([lost], SITE) == ("", 1)  # APEL refuses a message without records


def test_an_apel_field_is_one_printable_line_and_a_jobs_odd_text_is_left_out():
    for bad in ("", " padded", "two\nlines", "bell\x07", "x" * 300):
        with pytest.raises(ValueError, match="site: "):
            ApelSite(site=bad, submit_host="ce", machine="wn", hepspec=10)
    for hepspec in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="HEPSPEC06"):
            ApelSite(site="S", submit_host="ce", machine="wn", hepspec=hepspec)
    odd = record_of(entry([("reserved", 1.0), ("running", 2.0), ("closed", 3.0)], consumed=Consumed(cpu_seconds=1.0),
                          queue="q\n%%\nSite: OTHER"))
    message, _ = apel_message([odd], SITE)
    assert "OTHER" not in message and "Queue:" not in message and message.count("%%") == 1


@pytest.mark.parametrize("text, expected", [
    (None, 0.0), ("90m", 10_000.0 - 5400), ("3600", 10_000.0 - 3600), ("1970-01-01T02:00:00+00:00", 7200.0),
])
def test_since_is_a_time_ago_or_a_date(text, expected):
    assert parse_since(text, 10_000.0) == expected


def test_since_as_a_local_date():
    assert parse_since("2024-05-01", 0) == time.mktime((2024, 5, 1, 0, 0, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="neither a date"):
        parse_since("yesterday", 0)


# -- test:///default ---------------------------------------------------------------------------------


def test_teardown_records_what_it_could_read_and_suspend_resume_the_guest(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    paused = suspend(config, job.job_id)
    assert (paused.outcome, paused.state) == (Outcome.OK, "paused"), paused.message
    assert suspend(config, job.job_id).state == "paused"  # idempotent
    assert resume(config, job.job_id).state == "running"
    assert resume(config, job.job_id).outcome is Outcome.OK
    assert teardown(config, job.job_id).outcome is Outcome.OK
    (record,) = accounting(config).records
    # the test driver keeps no CPU statistics: the record says so instead of inventing figures
    assert (record.job_id, record.user, record.vo, record.cpu_seconds, record.note) == \
        (job.job_id, "cms001", "cms", None, GONE)
    assert record.provision_seconds >= 0 and record.wall_seconds >= 0
    for action in (suspend, resume):
        gone = action(config, job.job_id)
        assert gone.outcome is Outcome.FAIL_JOB and "no running guest" in gone.message


def test_a_stopped_process_is_told_from_a_running_a_traced_and_a_dead_one():
    assert stopped_state(b"12 (a) b) T 1 2") is True  # the command name may hold ") "
    assert (stopped_state(b"12 (sh) S 1"), stopped_state(b"12 (sh) t 1"), stopped_state(b"12 (sh) Z 1")) == \
        (False, False, None)


def until(condition, limit=60.0):
    """Wait for ``condition()`` (bounded: a hang is a failure, a slow host is not)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def guest_state(conn, config, job):
    from blahvm.hypervisor.guests import domain_state
    from blahvm.lifecycle._common import job_names

    return domain_state(conn, job_names(config, job.job_id).guest)


def test_follow_pauses_the_guest_while_its_starter_is_stopped(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    starter = subprocess.Popen(["sleep", "600"])
    results = []
    follower = threading.Thread(target=lambda: results.append(follow(config, job.job_id, [starter.pid], poll=0.05)))
    follower.start()
    try:
        os.kill(starter.pid, signal.SIGSTOP)
        until(lambda: guest_state(keep_driver, config, job) == "paused")
        os.kill(starter.pid, signal.SIGCONT)
        until(lambda: guest_state(keep_driver, config, job) == "running")
        assert suspend(config, job.job_id).state == "paused"  # an admin's pause is not follow's to undo
        time.sleep(0.3)
        assert guest_state(keep_driver, config, job) == "paused"
        assert resume(config, job.job_id).state == "running"
        os.kill(starter.pid, signal.SIGSTOP)
        until(lambda: guest_state(keep_driver, config, job) == "paused")
    finally:
        starter.kill()
        starter.wait()
        follower.join(60)
    (done,) = results
    assert (done.outcome, done.state) == (Outcome.OK, "running"), done.message  # resumed: the starter is gone
    assert "paused 2 times" in done.message
    assert follow(config, "no.such.job", [os.getpid()]).outcome is Outcome.FAIL_JOB
    teardown(config, job.job_id)


def test_accounting_command_prints_one_record_per_run(site):  # noqa: F811
    for job in ("1.srv", "2.srv"):
        assert cli_prepare(site, job, "--no-wait").returncode == 0
        assert blahvm("teardown", "--config", site, "--job-id", job).returncode == 0
    shown = blahvm("accounting", "--config", site, "--json")
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [line["job_id"] for line in lines] == ["1.srv", "2.srv"]
    only = blahvm("accounting", "--config", site, "--json", "--job-id", "2.srv").stdout.splitlines()
    assert [json.loads(line)["job_id"] for line in only] == ["2.srv"]
    assert {"job_id", "user", "vo", "environment", "cpu_seconds", "wall_seconds", "provision_seconds",
            "max_memory_bytes", "disk_read_bytes", "disk_write_bytes"} <= set(lines[0])
    assert (lines[0]["user"], lines[0]["vo"], lines[0]["environment"]) == ("nobody", "cms", "demo")
    table = blahvm("accounting", "--config", site, "--since", "1h").stdout.splitlines()
    assert table[0].split()[:4] == ["JOB", "USER", "VO", "ENVIRONMENT"] and len(table) == 3
    assert blahvm("accounting", "--config", site, "--since", "2999-01-01").stdout == \
        "no job ended on this host in that time\n"
    bad = blahvm("accounting", "--config", site, "--since", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stdout == ""
    # test:///default keeps no CPU time: an APEL message leaves both runs out and says so
    apel = blahvm("accounting", "--config", site, "--apel", "EXAMPLE-SITE", "--hepspec", "10")
    assert (apel.returncode, apel.stdout) == (0, "") and "2 run(s) left out" in apel.stderr, apel.stderr
    for wrong, said in ((["--apel", "S"], "--apel needs --hepspec"), (["--hepspec", "10"], "go with --apel"),
                        (["--apel", "two words\nline", "--hepspec", "1"], "--apel: site: must be one line"),
                        (["--apel", "S", "--hepspec", "nan"], "HEPSPEC06")):
        refused = blahvm("accounting", "--config", site, *wrong)
        assert refused.returncode == 2 and said in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    missing = blahvm("suspend", "--config", site, "--job-id", "9.srv")
    assert missing.returncode == 76 and missing.stderr == "blahvm: suspend 9.srv: no running guest\n"


# -- a real guest ------------------------------------------------------------------------------------

# Burns 2 s of CPU as the guest's own clock counts it (utime+stime of the shell and its children, in
# USER_HZ = 100 ticks), then prints what it counted.
BURN = ('while :; do set -- $(cat /proc/$$/stat); t=$((${14}+${15}+${16}+${17})); [ $t -ge 200 ] && break; '
        'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; done; echo $t')
COUNT = "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.1; done; exit 3"
# A job starter as a batch system runs it: its own process, which the test stops and continues.
STARTER = ("import sys; from blahvm.lifecycle import launch; from blahvm.model import Decision, HostConfig, Job, "
           "SiteConfig; run_dir, state_dir, job_id = sys.argv[1:]; "
           "config = SiteConfig(host=HostConfig(run_dir=run_dir, state_dir=state_dir)); "
           "job = Job(job_id=job_id, user='nobody', decision=Decision('q', 'demo', 'r', None, 1, 1)); "
           f"sys.exit(launch(config, job, ['sh', '-c', {COUNT!r}]))")


def vcpu_delay(guest):
    """Seconds the guest's vcpus waited on the host's run queue (libvirt's vcpu.N.delay), all vcpus."""
    import subprocess

    shown = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "domstats", "--vcpu", guest],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    return sum(int(line.split("=")[1]) for line in shown.split() if ".delay=" in line) / 1e9


def output_settled(chunks, quiet=1.0, limit=30.0):
    """The output once nothing new came for ``quiet`` seconds (what was in flight at the pause has landed)."""
    deadline = time.monotonic() + limit
    seen = b"".join(chunks)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = b"".join(chunks)
        if now == seen:
            return now
        seen = now
    raise AssertionError("the paused guest's payload kept writing")


@pytest.mark.guest
def test_real_guest_pauses_with_its_job_and_its_usage_is_accounted(demo_image):
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.stats import domain_usage
    from blahvm.lifecycle import launch

    with real_site(demo_image) as config:
        job = real_job(f"acct-{uuid.uuid4().hex[:6]}", demo_image)
        try:
            result = prepare(config, job, ready_timeout=READY_TIMEOUT)
            assert result.outcome is Outcome.OK, result.message

            # suspend: a payload counting every 0.1 s makes no progress while its guest is paused
            read_fd, write_fd = os.pipe()
            chunks, codes = [], []
            runner = threading.Thread(target=lambda: codes.append(
                launch(config, job, ["sh", "-c", COUNT], stdout=write_fd, ready_timeout=READY_TIMEOUT)))
            reader = threading.Thread(target=lambda: [chunks.append(c) for c in iter(lambda: os.read(read_fd, 4096), b"")])
            runner.start()
            reader.start()
            while b"".join(chunks).count(b"\n") < 3:
                assert runner.is_alive(), codes
                time.sleep(0.05)
            paused = suspend(config, job.job_id)
            assert (paused.outcome, paused.state) == (Outcome.OK, "paused"), paused.message
            with open_connection(config.hypervisor.uri, timeout=30) as conn:
                before = output_settled(chunks)
                vcpu_before = domain_usage(conn, result.guest).vcpu_seconds
                time.sleep(3)
                assert b"".join(chunks) == before and runner.is_alive()
                assert domain_usage(conn, result.guest).vcpu_seconds == pytest.approx(vcpu_before, abs=0.05)
            resumed = resume(config, job.job_id)
            assert (resumed.outcome, resumed.state) == (Outcome.OK, "running"), resumed.message
            runner.join(120)
            os.close(write_fd)
            reader.join(30)
            os.close(read_fd)
            assert codes == [3] and b"".join(chunks) == b"".join(b"%d\n" % i for i in range(30))
            lines_out = before.count(b"\n")
            print(f"paused with {lines_out} of 30 lines out; no line and no vcpu time for 3 s")

            # follow: the starter stopped as a batch system stops it, the guest pauses; continued, it runs
            starter = subprocess.Popen([sys.executable, "-c", STARTER, config.host.run_dir, config.host.state_dir,
                                            job.job_id],
                                       stdout=subprocess.PIPE)
            followed = []
            follower = threading.Thread(target=lambda: followed.append(follow(config, job.job_id, [starter.pid])))
            follower.start()
            first = starter.stdout.readline()
            assert first == b"0\n"
            os.kill(starter.pid, signal.SIGSTOP)
            with open_connection(config.hypervisor.uri, timeout=30) as conn:
                until(lambda: guest_state(conn, config, job) == "paused")
                vcpu_before = domain_usage(conn, result.guest).vcpu_seconds
                time.sleep(3)
                assert domain_usage(conn, result.guest).vcpu_seconds == pytest.approx(vcpu_before, abs=0.05)
                os.kill(starter.pid, signal.SIGCONT)
                until(lambda: guest_state(conn, config, job) in ("running", "blocked"))
            rest = starter.stdout.read()
            assert starter.wait(120) == 3 and first + rest == b"".join(b"%d\n" % i for i in range(30))
            follower.join(60)
            assert followed and followed[0].outcome is Outcome.OK and "paused 1 times" in followed[0].message

            # accounting: the CPU the payload burnt and the bytes dd wrote are in the record
            with open_connection(config.hypervisor.uri, timeout=30) as conn:
                start = domain_usage(conn, result.guest)
            waited = vcpu_delay(result.guest)
            with open(os.devnull, "wb") as null:
                out_r, out_w = os.pipe()
                code = launch(config, job, ["sh", "-c", BURN], stdout=out_w, ready_timeout=READY_TIMEOUT)
                os.close(out_w)
                ticks = int(os.read(out_r, 100))
                os.close(out_r)
                assert code == 0
                dd = ["dd", "if=/dev/zero", "of=/var/tmp/blob", "bs=1M", "count=8", "conv=fsync"]
                assert launch(config, job, dd, stdout=null.fileno(), stderr=null.fileno()) == 0
            waited = vcpu_delay(result.guest) - waited
        finally:
            done = teardown(config, job.job_id)
        assert done.outcome is Outcome.OK, done.message
        (record,) = [r for r in accounting(config).records if r.job_id == job.job_id]
        burnt = record.cpu_seconds - start.cpu_seconds
        written = record.disk_write_bytes - start.disk_write_bytes
        print(f"guest counted {ticks / 100:.2f}s of CPU; host: {burnt:.2f}s of QEMU, "
              f"{record.vcpu_seconds - start.vcpu_seconds:.2f}s of vcpu, {waited:.2f}s of vcpu waiting for a core; "
              f"{written / MiB:.1f} MiB written; "
              f"provision {record.provision_seconds:.1f}s, wall {record.wall_seconds:.1f}s, "
              f"cpu {record.cpu_seconds:.1f}s, memory {record.max_memory_bytes / MiB:.0f} MiB")
        # A lower bound on work done, not on speed. The guest's clock runs on while the host has its vcpu
        # thread waiting for a core (steal, which TCG does not report to the guest): the guest counts that
        # as its own CPU, the host does not, so what the host ran plus what it made the vcpu wait covers it.
        assert ticks >= 200 and burnt + waited >= 1.5, (burnt, waited)
        assert written >= 8 * MiB
        assert record.max_memory_bytes > 0 and record.disk_read_bytes > 0 and record.note is None
        assert record.wall_seconds > 0 and record.provision_seconds > 0
        # the same run as APEL sees it: the guest's CPU seconds, the slot's wall time, its peak memory
        message, skipped = apel_message([record], ApelSite("EXAMPLE-SITE", "ce.example.org", "wn1", 10.0))
        fields = dict(line.split(": ", 1) for line in message.splitlines()[1:-1])
        assert skipped == 0 and fields["CpuDuration"] == str(round(record.cpu_seconds))
        assert fields["MemoryReal"] == str(record.max_memory_bytes // 1024) and fields["LocalJobId"] == job.job_id
