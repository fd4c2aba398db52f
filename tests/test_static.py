"""Static environments: leases in the ledger, on libvirt's test driver, and on two real site guests."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import uuid

import attrs
import pytest

from blahvm.hypervisor import guests, snapshots
from blahvm.hypervisor.connection import open_connection
from blahvm.ledger import Ledger, LedgerError, NoCapacity, State
from blahvm.lifecycle import capacity, launch, prepare, reap, teardown
from blahvm.model import Decision, Environment, HostConfig, HypervisorConfig, Job, Outcome, Queue, SiteConfig
from blahvm.quantities import Size

pytest.importorskip("libvirt")

MiB = 1024**2
TEST_URI = "test:///default"


def make_job(job_id, environment="static", uid=None, gid=None):
    decision = Decision(queue="short", environment=environment, rule="r", vo="cms", memory=Size(256 * MiB), vcpus=1)
    return Job(job_id=job_id, user="cms001", decision=decision, uid=uid, gid=gid)


def make_config(where, names, uri=TEST_URI, **environment):
    fields = dict(name="static", image="/nonexistent/unused.qcow2", flavour="kvm", memory=Size(256 * MiB), vcpus=1)
    fields.update(environment)
    return SiteConfig(
        # a pool of its own per test: libvirt's test driver keeps pools for the whole process
        hypervisor=HypervisorConfig(uri=uri, pool=f"blahvm-{abs(hash(where)) % 10**8}", pool_path=os.path.join(where, "clones"),
                                    domain_type="qemu", timeout=60),
        host=HostConfig(max_guests=4, state_dir=os.path.join(where, "state"), run_dir=os.path.join(where, "run")),
        environments={"static": Environment(guests=tuple(names), **fields)},
    )


def site_domain_xml(name, domain_type, disk, socket, kernel="", initrd="", cmdline="", golden=""):
    """A static guest as a site defines it: its own disk, the agent channel, ACPI (poweroff stops it).
    A disk on a golden names it as its backing store, never to be relabelled (docs/images.md)."""
    boot = f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>" if kernel else ""
    backing = (f"<backingStore type='file'><format type='qcow2'/><source file='{golden}'>"
               "<seclabel model='dac' relabel='no'/></source><backingStore/></backingStore>") if golden else ""
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>{backing}
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='{socket}'/>
      <target type='virtio' name='org.blahvm.agent.0'/>
    </channel>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def define_site_guest(conn, xml, snapshot=True):
    domain = conn.raw.defineXML(xml)
    if snapshot:
        domain.snapshotCreateXML(f"<domainsnapshot><name>{snapshots.CLEAN_SNAPSHOT}</name></domainsnapshot>", 0)
    return domain


def remove_site_guest(conn, name):
    module = snapshots.libvirt()
    with contextlib.suppress(Exception):
        domain = conn.raw.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(module.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


# -- the lease in the ledger ---------------------------------------------------------------------


def test_ledger_leases_each_guest_once_and_frees_it_on_close(tmp_path):
    with Ledger(HostConfig(max_guests=5, state_dir=str(tmp_path))) as ledger:
        first = ledger.reserve("1", "u", None, "static", MiB, 1, lease=["a", "b"])
        second = ledger.reserve("2", "u", None, "static", MiB, 1, lease=["a", "b"])
        assert (first.guest, second.guest) == ("a", "b")
        with pytest.raises(NoCapacity, match="static guests"):
            ledger.reserve("3", "u", None, "static", MiB, 1, lease=["a", "b"])
        ledger.close("1", Outcome.OK)
        assert ledger.reserve("3", "u", None, "static", MiB, 1, lease=["a", "b"]).guest == "a"
        with pytest.raises(LedgerError, match="inconsistent"):  # the database itself refuses a second holder
            ledger.reserve("4", "u", None, "dynamic", MiB, 1)
            ledger.transition("4", State.RESERVED, State.CLONING, guest="b")


def _reserve_in_child(path, job_id, queue):
    with Ledger(HostConfig(max_guests=16, state_dir=path)) as ledger:
        try:
            queue.put(ledger.reserve(job_id, "u", None, "static", MiB, 1, lease=["a", "b", "c"]).guest)
        except NoCapacity:
            queue.put(None)


def test_concurrent_reservations_never_lease_one_guest_twice(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_reserve_in_child, args=(str(tmp_path), f"j{n}", queue)) for n in range(8)]
    for worker in workers:
        worker.start()
    leased = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sorted(guest for guest in leased if guest) == ["a", "b", "c"]
    assert leased.count(None) == 5


# -- on libvirt's test driver ---------------------------------------------------------------------


@pytest.fixture
def test_site(tmp_path):
    """Two static guests (and one without a snapshot) on test:///default, held for the test."""
    with open_connection(TEST_URI, timeout=10) as conn:
        names = [f"site-{uuid.uuid4().hex[:6]}-{n}" for n in range(3)]
        for index, name in enumerate(names):
            xml = site_domain_xml(name, "test", f"/images/{name}.qcow2", f"/site/{name}.sock")
            define_site_guest(conn, xml, snapshot=index < 2)
        try:
            yield conn, names
        finally:
            for name in names:
                remove_site_guest(conn, name)


def test_prepare_leases_free_guests_in_order_then_retries_elsewhere(tmp_path, test_site):
    conn, (first, second, _) = test_site
    config = make_config(str(tmp_path), [first, second])
    a = prepare(config, make_job("1"), ready_timeout=None)
    b = prepare(config, make_job("2"), ready_timeout=None)
    assert (a.outcome, a.guest, b.outcome, b.guest) == (Outcome.OK, first, Outcome.OK, second), (a, b)
    assert snapshots.agent_socket(snapshots.definition(conn, first)) == a.socket  # in the job's run dir
    assert guests.domain_state(conn, first) == "running"
    third = prepare(config, make_job("3"), ready_timeout=None)
    assert third.outcome is Outcome.RETRY_ELSEWHERE and "all 2 of its guests are leased" in third.message
    assert capacity(config).environments == ()
    again = prepare(config, make_job("1"), ready_timeout=None)
    assert again.reused and again.guest == first


def test_a_lease_counts_in_its_queues_slots_per_host(tmp_path, test_site):
    conn, (first, second, _) = test_site
    config = attrs.evolve(make_config(str(tmp_path), [first, second]), queues={"short": Queue("short", slots_per_host=1)})
    assert prepare(config, make_job("1"), ready_timeout=None).guest == first
    refused = prepare(config, make_job("2"), ready_timeout=None)  # a guest is free, the queue's slot is not
    assert refused.outcome is Outcome.RETRY_ELSEWHERE and "slots of queue short exhausted" in refused.message
    with Ledger(config.host) as ledger:
        assert [(entry.job_id, entry.queue) for entry in ledger.live()] == [("1", "short")]
    assert teardown(config, "1").outcome is Outcome.OK
    assert prepare(config, make_job("2"), ready_timeout=None).outcome is Outcome.OK
    assert teardown(config, "2").outcome is Outcome.OK


def test_teardown_returns_the_guest_clean_and_defined(tmp_path, test_site):
    conn, (first, second, _) = test_site
    config = make_config(str(tmp_path), [first, second])
    leased = prepare(config, make_job("1"), ready_timeout=None)
    assert leased.outcome is Outcome.OK
    done = teardown(config, "1")
    assert done.outcome is Outcome.OK and done.guest_removed, done.message
    assert guests.domain_state(conn, first) == "shutoff"  # still defined
    assert snapshots.agent_socket(snapshots.definition(conn, first)) == f"/site/{first}.sock"  # site's own again
    assert not os.path.exists(leased.run_dir)
    assert teardown(config, "1").outcome is Outcome.OK  # idempotent
    assert "static guests free: static 2" in capacity(config).message
    assert capacity(config).environments == ("static",)


def test_guests_that_cannot_be_leased_are_skipped_and_named(tmp_path, test_site):
    conn, (first, _, unsnapshotted) = test_site
    config = make_config(str(tmp_path), ["missing-guest", unsnapshotted, first])
    assert prepare(config, make_job("1"), ready_timeout=None).guest == first
    refused = prepare(config, make_job("2"), ready_timeout=None)
    assert refused.outcome is Outcome.RETRY_ELSEWHERE and "\n" not in refused.message
    assert "all 1 of its guests are leased" in refused.message
    teardown(config, "1")
    none_left = make_config(str(tmp_path), ["missing-guest", unsnapshotted])
    refused = prepare(none_left, make_job("3"), ready_timeout=None)
    assert refused.outcome is Outcome.RETRY_ELSEWHERE and "\n" not in refused.message
    assert "missing-guest is not defined" in refused.message
    assert f"virsh snapshot-create-as {unsnapshotted} blahvm-clean" in refused.message


def test_reap_stops_free_guests_and_frees_dead_leases_without_undefining(tmp_path, test_site):
    conn, (first, second, _) = test_site
    config = make_config(str(tmp_path), [first, second])
    assert prepare(config, make_job("1"), ready_timeout=None).guest == first
    conn.raw.lookupByName(first).destroy()  # the leased guest died: its lease is dead
    conn.raw.lookupByName(second).create()  # a free guest someone started by hand
    report = reap(config)
    assert report.outcome is Outcome.OK and report.entries_closed == ("1",), report.message
    assert report.guests == () and f"returned static guests clean: {second}" in report.message
    assert guests.domain_state(conn, first) == guests.domain_state(conn, second) == "shutoff"
    with Ledger(config.host) as ledger:
        assert ledger.live() == ()


# -- two real site guests on qemu:///system -------------------------------------------------------

READY_TIMEOUT = 120.0


@contextlib.contextmanager
def real_static_site(demo_image):
    """Two site guests, each on its own overlay of the demo golden, snapshot 'blahvm-clean' made."""
    from blahvm.services import ensure_libvirt

    ensure_libvirt("qemu:///system", timeout=90)
    where = tempfile.mkdtemp(prefix="static-test-", dir="/var/tmp")
    os.chmod(where, 0o755)  # QEMU's user reaches the disks below it
    names = [f"site-static-{uuid.uuid4().hex[:6]}-{n}" for n in range(2)]
    config = make_config(where, names, uri="qemu:///system")
    try:
        with open_connection("qemu:///system", timeout=60) as conn:
            for name in names:
                disk = os.path.join(where, name + ".qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", demo_image.image, disk],
                               check=True)
                xml = site_domain_xml(name, "qemu", disk, os.path.join(where, name + ".sock"),
                                      demo_image.kernel, demo_image.initrd, demo_image.cmdline, demo_image.image)
                define_site_guest(conn, xml)
        yield config
    finally:
        with contextlib.suppress(Exception):
            reap(config)
        with open_connection("qemu:///system", timeout=60) as conn:
            for name in names:
                remove_site_guest(conn, name)
        for command in ("pool-destroy", "pool-undefine"):  # reap made the clone pool; it is this test's
            subprocess.run(["virsh", "-c", "qemu:///system", command, config.hypervisor.pool], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def run_in_guest(config, job, script):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = launch(config, job, ["sh", "-c", script], stdout=out.fileno(), stderr=err.fileno(),
                      ready_timeout=READY_TIMEOUT)
        out.seek(0)
        err.seek(0)
        return code, out.read() + err.read()


def _prepare_in_child(where, names, job, queue):
    config = make_config(where, names, uri="qemu:///system")  # a SiteConfig does not pickle: made again here
    result = prepare(config, job, ready_timeout=READY_TIMEOUT)
    queue.put((job.job_id, result.outcome, result.guest, result.message))


@pytest.mark.guest
def test_real_static_guests_are_leased_once_and_returned_clean(demo_image):
    with real_static_site(demo_image) as config:
        first_guest, second_guest = config.environments["static"].guests
        dirty = make_job(f"st-{uuid.uuid4().hex[:6]}", uid=0, gid=0)  # root's job, to write /root
        result = prepare(config, dirty, ready_timeout=READY_TIMEOUT)  # boot 1
        assert (result.outcome, result.guest) == (Outcome.OK, first_guest), result.message
        assert run_in_guest(config, dirty, "echo dirty > /root/dirty && sync") == (0, b"")
        done = teardown(config, dirty.job_id)
        assert done.outcome is Outcome.OK, done.message

        jobs = [make_job(f"st-{uuid.uuid4().hex[:6]}", uid=0, gid=0) for _ in range(2)]
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        where = os.path.dirname(config.host.state_dir)
        workers = [
            context.Process(target=_prepare_in_child, args=(where, [first_guest, second_guest], job, queue))
            for job in jobs
        ]
        try:
            for worker in workers:  # boots 2 and 3, at once
                worker.start()
            results = [queue.get(timeout=3 * READY_TIMEOUT) for _ in workers]
            for worker in workers:
                worker.join(30)
            assert {outcome for _, outcome, _, _ in results} == {Outcome.OK}, results
            assert {guest for _, _, guest, _ in results} == {first_guest, second_guest}
            third = prepare(config, make_job("st-third", uid=0, gid=0), ready_timeout=READY_TIMEOUT)
            assert third.outcome is Outcome.RETRY_ELSEWHERE, third.message
            on_first = next(job for job in jobs for job_id, _, guest, _ in results
                            if guest == first_guest and job_id == job.job_id)
            code, output = run_in_guest(config, on_first, "test -e /root/dirty && echo still-dirty; true")
            assert (code, output) == (0, b"")  # the revert took the first job's write away
        finally:
            for job in jobs:
                assert teardown(config, job.job_id).outcome is Outcome.OK
        with open_connection("qemu:///system", timeout=60) as conn:
            for name in (first_guest, second_guest):
                assert guests.domain_state(conn, name) == "shutoff"
                assert snapshots.has_snapshot(conn, name)
        with Ledger(config.host) as ledger:
            assert ledger.live() == ()
