"""The common batch interface: logic on libvirt's in-process test driver, and a few real guests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import attrs
import pytest

from blahvm import jobshare
from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import open_connection
from blahvm.hypervisor.storage import ClonePool
from blahvm.ledger import Ledger, State
from blahvm.lifecycle._common import job_names
from blahvm.lifecycle import (
    LAUNCH_FAILED,
    accounting,
    capacity,
    launch,
    prepare,
    reap,
    teardown,
    templates,
)
from blahvm.model import Decision, Environment, HostConfig, HypervisorConfig, Job, Outcome, Queue, SiteConfig
from blahvm.quantities import Size

pytest.importorskip("libvirt")

MiB = 1024**2
TEST_URI = "test:///default"
POOL_PATH = "/var/lib/blahvm/test-clones"  # the test driver keeps pools in memory: no files


# -- test:///default ----------------------------------------------------------------------------


def make_config(tmp_path, golden, uri=TEST_URI, pool_path=POOL_PATH, pool="blahvm", domain_type="qemu", **host):
    image, sha = golden[:2]
    env = dict(name="demo", image=image, flavour="kvm", memory=Size(256 * MiB), vcpus=1, sha256=sha)
    env.update(golden[2] if len(golden) > 2 else {})
    environments = {"demo": Environment(**env)}
    host.setdefault("max_guests", 2)
    host.setdefault("memory", Size(1024 * MiB))
    host.setdefault("vcpus", 4)
    return SiteConfig(
        hypervisor=HypervisorConfig(uri=uri, pool=pool, pool_path=pool_path, domain_type=domain_type, timeout=60),
        host=HostConfig(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), **host),
        environments=environments,
    )


def make_job(job_id="1234.server", environment="demo", memory=256 * MiB, uid=None, gid=None, vcpus=1):
    decision = Decision(queue="short", environment=environment, rule="r", vo="cms", memory=Size(memory), vcpus=vcpus)
    return Job(job_id=job_id, user="cms001", decision=decision, uid=uid, gid=gid, name="a job")


def guest_of(config, job_id):
    """The guest blahvm names for ``job_id`` in the installation ``config`` describes (its state dir
    is in the name): every test that expects a job's guest asks here, never ``naming`` directly."""
    return job_names(config, job_id).guest


def live_entries(config):
    with Ledger(config.host) as ledger:
        return ledger.live()


MAKER_TIMEOUT = 900  # a template maker boots a guest: generous, for a loaded host


def settle_templates(config):
    """Wait until no template maker of this site works (a job that booted for want of a template
    started one), then check that the makers left nothing but their templates: a template made or
    in the making is the site's state, its maker's guest, volume, run dir or scratch dir after it
    ended is a leak."""
    assert templates.wait_for_makers(config, MAKER_TIMEOUT), "a template maker still works"
    assert templates.leftovers(config, set()) == []


def domain_names(conn):
    return {guest.name for guest in guests.list_blahvm_guests(conn)}


def volume_names(config, conn):
    """The site's volumes, once its template makers are done (``settle_templates``)."""
    settle_templates(config)
    pool = ClonePool.ensure(conn, config.hypervisor.pool, config.hypervisor.pool_path)
    return {volume.name for volume in pool.list_volumes() if volume.name.startswith(naming.PREFIX)}


def run_dirs(config):
    """The site's run dirs, once its template makers are done (``settle_templates``)."""
    settle_templates(config)
    try:
        return set(os.listdir(config.host.run_dir))
    except FileNotFoundError:
        return set()


def shares_left(config):
    """Mounts and entries under the share root: the share's part of every leak check."""
    root = jobshare.share_root(config.host.run_dir)
    return jobshare.shared_mounts(root) + jobshare.leftovers(root, set())


def assert_nothing_left(config, conn):
    settle_templates(config)
    assert domain_names(conn) == set()
    assert volume_names(config, conn) == set()
    assert run_dirs(config) == set()  # control sockets (RUN_DIR.ctl) included
    assert shares_left(config) == []
    assert live_entries(config) == ()


def test_prepare_makes_guest_clone_run_dir_and_ledger_entry(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    assert result.guest == guest_of(config, job.job_id) and not result.reused
    assert domain_names(keep_driver) == {result.guest}
    assert volume_names(config, keep_driver) == {result.guest + ".qcow2"}
    assert os.stat(result.run_dir).st_mode & 0o777 == 0o700
    (entry,) = live_entries(config)
    assert (entry.job_id, entry.state, entry.guest) == (job.job_id, State.RUNNING, result.guest)  # handed over
    assert entry.volumes == (result.guest + ".qcow2",) and entry.run_dir == result.run_dir
    assert {"clone", "boot"} <= dict(entry.timings).keys()
    assert "\n" not in result.message
    teardown(config, job.job_id)


@pytest.mark.parametrize("vcpus, ports", [(1, 1), (3, 3), (40, 16)])
def test_each_vcpu_gets_its_own_agent_port_in_the_run_dir(tmp_path, golden, keep_driver, vcpus, ports):
    import xml.etree.ElementTree as ET

    config = make_config(tmp_path, (*golden, {"vcpus": 64}), vcpus=64)
    result = prepare(config, make_job(vcpus=vcpus), ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    xml = keep_driver.raw.lookupByName(result.guest).XMLDesc()
    channels = ET.fromstring(xml).findall("./devices/channel")
    assert [(c.find("target").get("name"), c.find("source").get("path")) for c in channels] == [
        *((f"org.blahvm.agent.{i}", os.path.join(result.run_dir, f"agent.{i}.sock")) for i in range(ports)),
        ("org.blahvm.control", result.run_dir + ".ctl")]  # beside the run dir: root's, never the user's
    teardown(config, "1234.server")


def test_hostile_job_id_and_name_stay_out_of_paths_and_xml(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = Job(job_id="../../etc/x'<&>\n$(id)", user="u<&>", decision=make_job().decision, name="]]></name>")
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    assert os.path.dirname(result.run_dir) == config.host.run_dir
    (guest,) = guests.list_blahvm_guests(keep_driver)
    assert (guest.metadata.job_id, guest.metadata.user, guest.metadata.name) == (job.job_id, job.user, job.name)
    assert teardown(config, job.job_id).outcome is Outcome.OK
    assert_nothing_left(config, keep_driver)


def test_prepare_twice_reuses_the_guest_and_holds_one_slot(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    first = prepare(config, job, ready_timeout=None)
    second = prepare(config, job, ready_timeout=None)
    assert (first.outcome, second.outcome) == (Outcome.OK, Outcome.OK)
    assert second.reused and second.guest == first.guest
    assert len(live_entries(config)) == 1
    assert capacity(config).guests == 1
    teardown(config, job.job_id)


def test_slot_accounting_retry_when_full_fail_when_never_fits(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden, max_guests=1, memory=Size(512 * MiB))
    assert capacity(config).environments == ("demo",)
    assert prepare(config, make_job("a"), ready_timeout=None).outcome is Outcome.OK
    full = capacity(config)
    assert (full.guests, full.memory, full.vcpus, full.environments) == (0, Size(256 * MiB), 3, ())
    busy = prepare(config, make_job("b"), ready_timeout=None)
    assert busy.outcome is Outcome.RETRY_ELSEWHERE and "guests exhausted" in busy.message
    teardown(config, "a")
    huge = SiteConfig(
        hypervisor=config.hypervisor,
        host=config.host,
        environments={"demo": Environment("demo", golden[0], "kvm", Size(1024 * MiB), 1, sha256=golden[1])},
    )
    never = prepare(huge, make_job("c", memory=1024 * MiB), ready_timeout=None)
    assert never.outcome is Outcome.FAIL_JOB and "offers only" in never.message
    assert_nothing_left(config, keep_driver)


def test_a_queues_slots_per_host_limits_its_live_guests_on_the_host(tmp_path, golden, keep_driver):
    config = attrs.evolve(make_config(tmp_path, golden, max_guests=3),
                          queues={"short": Queue("short", slots_per_host=1), "long": Queue("long")})
    in_long = attrs.evolve(make_job("c"), decision=attrs.evolve(make_job("c").decision, queue="long"))
    assert capacity(config).queues == (("short", 1),)
    assert prepare(config, make_job("a"), ready_timeout=None).outcome is Outcome.OK
    assert [entry.queue for entry in live_entries(config)] == ["short"]
    full = capacity(config)
    assert full.queues == (("short", 0),) and "queue slots free: short 0" in full.message
    assert full.guests == 2 and full.environments == ("demo",)  # the host has room: the queue has none
    busy = prepare(config, make_job("b"), ready_timeout=None)
    assert busy.outcome is Outcome.RETRY_ELSEWHERE
    assert busy.message == "no capacity on this host: slots of queue short exhausted (1 requested, 0 free of 1)"
    assert [entry.job_id for entry in live_entries(config)] == ["a"]
    assert prepare(config, in_long, ready_timeout=None).outcome is Outcome.OK  # another queue is not limited
    assert prepare(config, make_job("a"), ready_timeout=None).reused  # a re-run keeps its own slot
    teardown(config, "a")
    assert prepare(config, make_job("b"), ready_timeout=None).outcome is Outcome.OK
    for job_id in ("b", "c"):
        teardown(config, job_id)
    assert_nothing_left(config, keep_driver)


def test_job_problems_fail_the_job_without_taking_a_slot(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    unknown = prepare(config, make_job(environment="slc4"), ready_timeout=None)
    assert unknown.outcome is Outcome.FAIL_JOB and "slc4" in unknown.message
    too_big = prepare(config, make_job(memory=512 * MiB), ready_timeout=None)
    assert too_big.outcome is Outcome.FAIL_JOB
    bad_sum = make_config(tmp_path, (golden[0], "0" * 64))
    result = prepare(bad_sum, make_job(), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "sha256" in result.message
    assert_nothing_left(config, keep_driver)


@pytest.mark.parametrize("job_id, user", [("", "cms001"), ("7", "")])
def test_bad_job_fields_fail_the_job_with_one_line(tmp_path, golden, keep_driver, job_id, user):
    config = make_config(tmp_path, golden)
    job = Job(job_id=job_id, user=user, decision=make_job().decision)
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "\n" not in result.message
    assert_nothing_left(config, keep_driver)


def test_failure_midway_cleans_up_what_it_made(tmp_path, golden, keep_driver):
    # The clone and run dir are made, then the guest cannot be described (a kvm guest with pygrub).
    config = make_config(tmp_path, (golden[0], golden[1], {"bootloader": "/usr/bin/pygrub"}))
    result = prepare(config, make_job(), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "bootloader" in result.message
    assert "\n" not in result.message
    assert_nothing_left(config, keep_driver)
    with Ledger(config.host) as ledger:
        closed = ledger.get(make_job().job_id)
    assert closed.state is State.CLOSED and closed.volumes  # the trail was recorded first


def test_hypervisor_unavailable_is_retry_elsewhere(tmp_path, golden):
    config = make_config(tmp_path, golden, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    result = prepare(config, make_job(), ready_timeout=None)
    assert result.outcome is Outcome.RETRY_ELSEWHERE and "\n" not in result.message
    assert live_entries(config) == ()
    never = teardown(config, "x")  # nothing was ever made for it: no hypervisor needed (a Slurm Epilog must not drain)
    assert never.outcome is Outcome.OK and not never.guest_removed, never.message
    with Ledger(config.host) as ledger:  # a job the ledger knows may have a guest: that needs the hypervisor
        ledger.reserve("y", "cms001", None, "demo", 256 * MiB, 1)
    assert teardown(config, "y").outcome is Outcome.RETRY_ELSEWHERE
    assert [entry.job_id for entry in live_entries(config)] == ["y"]  # kept for a retry or reap
    assert reap(config).outcome is Outcome.RETRY_ELSEWHERE


def test_teardown_is_idempotent_and_gone_is_fine(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    first = teardown(config, job.job_id)
    assert first.outcome is Outcome.OK and first.guest_removed
    assert first.volumes_removed == (guest_of(config, job.job_id) + ".qcow2",)
    assert_nothing_left(config, keep_driver)
    again = teardown(config, job.job_id)
    assert again.outcome is Outcome.OK and not again.guest_removed
    assert teardown(config, "never-seen").outcome is Outcome.OK
    with Ledger(config.host) as ledger:
        entry = ledger.get(job.job_id)
    assert entry.outcome is Outcome.OK and entry.timing("teardown") is not None


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_owners_half_made_entry_is_cleaned_and_redone(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    names_guest = guest_of(config, job.job_id)
    pool = ClonePool.ensure(keep_driver, config.hypervisor.pool, config.hypervisor.pool_path)
    with Ledger(config.host) as ledger:  # a prologue that died right after making its clone
        entry = ledger.reserve(job.job_id, job.user, "cms", "demo", 256 * MiB, 1, pid=_dead_pid())
        ledger.transition(
            job.job_id, State.RESERVED, State.CLONING, guest=names_guest, volumes=[names_guest + ".qcow2"]
        )
    from blahvm.hypervisor.images import inspect_image

    pool.clone_overlay(inspect_image("demo", golden[0]), names_guest + ".qcow2")
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.OK and not result.reused, result.message
    (live,) = live_entries(config)
    assert live.id != entry.id and live.pid == os.getpid()
    teardown(config, job.job_id)
    assert_nothing_left(config, keep_driver)


def test_a_live_owner_still_preparing_is_not_disturbed(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    job = make_job()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with Ledger(config.host) as ledger:
            ledger.reserve(job.job_id, job.user, "cms", "demo", 256 * MiB, 1, pid=sleeper.pid)
        result = prepare(config, job, ready_timeout=None)
        assert result.outcome is Outcome.RETRY_ELSEWHERE and str(sleeper.pid) in result.message
        assert reap(config).entries_closed == ()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert reap(config).entries_closed == (job.job_id,)
    assert_nothing_left(config, keep_driver)


def test_reap_finds_orphans_and_dry_run_only_reports(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden, max_guests=3)
    orphan, kept, vanished = make_job("orphan"), make_job("kept"), make_job("vanished")
    for job in (orphan, kept, vanished):
        assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    with Ledger(config.host) as ledger:  # the ledger lost the orphan (say, moved aside after damage)
        ledger.close(orphan.job_id, Outcome.OK)
        for job in (kept, vanished):  # as after wait_ready
            ledger.transition(job.job_id, State.BOOTING, State.RUNNING)
    guests.destroy_and_undefine(keep_driver, guest_of(config, vanished.job_id))

    dry = reap(config, dry_run=True)
    assert dry.outcome is Outcome.OK and dry.dry_run
    assert dry.guests == (guest_of(config, orphan.job_id),)
    assert dry.entries_closed == (vanished.job_id,)
    assert len(domain_names(keep_driver)) == 2 and len(live_entries(config)) == 2  # untouched

    report = reap(config)
    assert report.guests == (guest_of(config, orphan.job_id),)
    # what closing the vanished job's entry removed counts too, as the dry run said it would
    assert set(report.volumes) == set(dry.volumes) == {guest_of(config, job.job_id) + ".qcow2"
                                                       for job in (orphan, vanished)}
    assert set(report.run_dirs) == set(dry.run_dirs) == {os.path.join(config.host.run_dir, guest_of(config, job.job_id))
                                                         for job in (orphan, vanished)}
    assert report.message.startswith("reap removed 1 guests, 2 volumes, 2 run dirs; closed 1 entries")
    assert report.entries_closed == (vanished.job_id,)
    assert domain_names(keep_driver) == {guest_of(config, kept.job_id)}
    assert volume_names(config, keep_driver) == {guest_of(config, kept.job_id) + ".qcow2"}
    assert [entry.job_id for entry in live_entries(config)] == [kept.job_id]
    assert reap(config).message.startswith("reap removed 0 guests, 0 volumes, 0 run dirs")
    teardown(config, kept.job_id)
    assert_nothing_left(config, keep_driver)


def test_a_dry_run_reap_makes_no_pool(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden, pool="blahvm-never-made")
    report = reap(config, dry_run=True)
    assert report.outcome is Outcome.OK and report.volumes == (), report.message
    pools = keep_driver.raw.listAllStoragePools(0)
    assert "blahvm-never-made" not in {pool.name() for pool in pools}


def test_launch_without_a_guest_says_why_on_stderr(tmp_path, golden):
    config = make_config(tmp_path, golden)
    read_fd, write_fd = os.pipe()
    try:
        code = launch(config, make_job(), ["/bin/true"], stderr=write_fd, ready_timeout=1)
        os.close(write_fd)
        message = os.read(read_fd, 4096).decode()
    finally:
        os.close(read_fd)
    assert code == LAUNCH_FAILED
    assert message.startswith("blahvm: job 1234.server could not run") and message.count("\n") == 1


# -- real guests ---------------------------------------------------------------------------------

READY_TIMEOUT = 120.0


@contextlib.contextmanager
def real_site(demo_image):
    """A config on qemu:///system with its own pool, state and run dirs; all removed afterwards."""
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="lifecycle-test-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    pool = f"blahvm-test-{uuid.uuid4().hex[:8]}"
    env = demo_image.environment("demo")
    config = SiteConfig(
        hypervisor=HypervisorConfig(
            uri="qemu:///system", pool=pool, pool_path=os.path.join(where, "clones"), domain_type="qemu", timeout=60
        ),
        host=HostConfig(max_guests=2, state_dir=os.path.join(where, "state"), run_dir=os.path.join(where, "run")),
        environments={"demo": env},
    )
    try:
        yield config
    finally:
        with contextlib.suppress(Exception):
            reap(config)
        with open_connection("qemu:///system", timeout=30) as conn:
            with contextlib.suppress(Exception):
                raw = conn.raw.storagePoolLookupByName(pool)
                raw.destroy()
                raw.undefine()
        shutil.rmtree(where, ignore_errors=True)


def real_job(job_id, demo_image):
    env = demo_image.environment("demo")
    decision = Decision(queue="short", environment="demo", rule="r", vo="cms", memory=env.memory, vcpus=env.vcpus)
    return Job(job_id=job_id, user="nobody", decision=decision, uid=65534, gid=65534)


def run_captured(config, job, argv):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = launch(config, job, argv, stdout=out.fileno(), stderr=err.fileno(), ready_timeout=READY_TIMEOUT)
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


@pytest.mark.guest
def test_real_guest_prepare_launch_teardown(demo_image):
    with real_site(demo_image) as config:
        job = real_job(f"lc-{uuid.uuid4().hex[:6]}", demo_image)
        try:
            result = prepare(config, job, ready_timeout=READY_TIMEOUT)
            assert result.outcome is Outcome.OK, result.message
            print(f"prepare: {result.message}; timings {dict(result.timings)}")
            status = os.stat(result.socket)
            assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (65534, 65534, 0o600)
            assert os.stat(result.run_dir).st_uid == 65534
            code, out, err = run_captured(config, job, ["/bin/echo", "hello"])
            assert (code, out) == (0, b"hello\n"), err
            again = prepare(config, job, ready_timeout=READY_TIMEOUT)
            assert again.outcome is Outcome.OK and again.reused and again.guest == result.guest
        finally:
            done = teardown(config, job.job_id)
        assert done.outcome is Outcome.OK and done.guest_removed, done.message
        print(f"teardown: {done.message}")
        with open_connection("qemu:///system", timeout=30) as conn:
            assert domain_names(conn) & {result.guest} == set()
            assert volume_names(config, conn) == set()
        assert run_dirs(config) == set() and live_entries(config) == ()


@pytest.mark.guest
def test_real_guest_destroyed_behind_our_back_is_reaped(demo_image):
    with real_site(demo_image) as config:
        job = real_job(f"lc-{uuid.uuid4().hex[:6]}", demo_image)
        try:
            result = prepare(config, job, ready_timeout=READY_TIMEOUT)
            assert result.outcome is Outcome.OK, result.message
            code, out, err = run_captured(config, job, ["sh", "-c", "exit 7"])
            assert (code, out) == (7, b""), err
            subprocess.run(["virsh", "-q", "-c", "qemu:///system", "destroy", result.guest], check=True,
                           stdout=subprocess.DEVNULL)
            report = reap(config)
            assert report.outcome is Outcome.OK and report.entries_closed == (job.job_id,), report.message
            assert live_entries(config) == ()
            (record,) = accounting(config).records  # libvirt kept nothing of it: the record says so
            assert record.cpu_seconds is None and record.note.startswith("no statistics: the guest was gone")
            with open_connection("qemu:///system", timeout=30) as conn:
                assert result.guest not in domain_names(conn)
                assert volume_names(config, conn) == set()
        finally:
            teardown(config, job.job_id)


def test_reap_leaves_the_guests_of_another_installation_alone(tmp_path, golden, keep_driver):
    ours = make_config(tmp_path / "ours", golden)
    theirs = make_config(tmp_path / "theirs", golden, pool="blahvm-theirs", pool_path=POOL_PATH + "-theirs")
    job = make_job("theirs.1")
    assert prepare(theirs, job, ready_timeout=None).outcome is Outcome.OK
    assert reap(ours).guests == ()  # same host, but another ledger made it
    assert guest_of(theirs, job.job_id) in domain_names(keep_driver)
    teardown(theirs, job.job_id)
