"""Jobs started from a saved post-boot state: the save file, the template's key, and real guests."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import attrs
import pytest

from blahvm.guest import client
from blahvm.hypervisor import guests, saved
from blahvm.hypervisor.connection import open_connection
from blahvm.hypervisor.domain import BackingFile, GuestMetadata
from blahvm.hypervisor.images import verify_image
from blahvm.lifecycle import prepare, reap, teardown, templates
from blahvm.model import Outcome
from blahvm.quantities import Size
from tests.test_lifecycle import (
    READY_TIMEOUT,
    live_entries,
    make_config,
    make_job,
    real_job,
    real_site,
    run_dirs,
    volume_names,
)

pytest.importorskip("libvirt")

MiB = 1024**2

SAVED_XML = """<domain type='qemu'>
  <name>blahvm-template-0123456789abcdef</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>0230c33d-09c0-46e8-85ff-324a420e5999</genid>
  <metadata><old/></metadata>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/blahvm-template-0123456789abcdef.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/img/golden.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <serial type='pty'><source path='/dev/pts/3'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='/run/blahvm/blahvm-template-0123456789abcdef/agent.0.sock'/>
      <target type='virtio' name='org.blahvm.agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/run/blahvm/blahvm-template-0123456789abcdef.ctl'/>
      <target type='virtio' name='org.blahvm.control'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
  </devices>
</domain>
"""


def _save_file(path, xml=SAVED_XML, stream=b"QEVM" + b"\x07" * 4096, cookie="<cookie/>"):
    header = saved.SaveHeader(saved.VERSION, True, saved.RAW, xml, cookie, 0)
    with open(path, "wb") as file:
        file.write(header.encode() + stream)
    return stream


# -- the save file and the job's definition (no guest) ------------------------------------------


def test_a_template_is_made_only_where_one_more_guest_fits_beside_the_jobs():
    """A template guest holds no slot while it is made: a full host leaves it to a later job."""
    from blahvm.ledger import Usage
    from blahvm.model import HostConfig

    host = HostConfig(max_guests=2, memory=Size(1024 * MiB), vcpus=2)
    shape = templates.Shape(Size(256 * MiB), 1)
    assert templates.no_room(host, Usage(1, Size(256 * MiB), 1), shape) is None
    assert "guests" in templates.no_room(host, Usage(2, Size(512 * MiB), 2), shape)
    assert "memory" in templates.no_room(host, Usage(1, Size(900 * MiB), 1), shape)


# A hook as the batch systems run it: the system python3, isolated, blahvm's directories written in.
HOOK = """\
import json, os, sys
sys.path[:0] = json.loads(sys.argv[1])
from blahvm.config import load_config
from blahvm.lifecycle import templates
config = load_config(sys.argv[2])
environment = config.environments["demo"]
pid = templates.make_in_background(config, environment, templates.Shape(environment.memory, environment.vcpus))
os.waitpid(pid, 0)
print(json.dumps(sorted(os.listdir(templates.root(config)))))
"""


def test_a_maker_started_from_a_hook_on_the_system_python_runs_blahvm(tmp_path, golden):
    """The maker runs on its starter's interpreter and import path: started from a hook whose python has
    blahvm on none of its own paths, it still imports blahvm, and so takes its mark away when it ends."""
    import json
    import subprocess

    from blahvm.batch.install import import_paths
    from blahvm.config.dump import dump_config

    config = make_config(tmp_path, golden)
    os.makedirs(config.host.state_dir)
    path = tmp_path / "site.yaml"
    path.write_text(dump_config(config))
    done = subprocess.run(["/usr/bin/python3", "-IS", "-c", HOOK, json.dumps(import_paths()), str(path)],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    left = json.loads(done.stdout)
    assert not [name for name in left if name.startswith(".maker-")], left  # a maker that never ran keeps it


def test_a_job_state_carries_the_jobs_xml_and_the_templates_stream_byte_for_byte(tmp_path):
    template = str(tmp_path / "state.save")
    stream = _save_file(template)
    header = saved.read_header(template)
    assert (header.xml.strip(), header.cookie, header.was_running) == (SAVED_XML.strip(), "<cookie/>", True)
    job = str(tmp_path / "job.save")
    saved.write_job_state(template, header, "<domain><name>blahvm-job</name></domain>", job,
                          os.path.getsize(template))
    written = saved.read_header(job)
    assert written.xml == "<domain><name>blahvm-job</name></domain>" and written.cookie == "<cookie/>"
    with open(job, "rb") as file:
        file.seek(written.stream_offset)
        assert file.read() == stream
    assert os.stat(job).st_mode & 0o777 == 0o600
    with pytest.raises(saved.SavedStateError, match="bytes"):  # a template that changed size since it was made
        saved.write_job_state(template, header, "<domain/>", str(tmp_path / "other.save"), 1)
    assert not os.path.exists(tmp_path / "other.save")


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:50], "truncated"),
    (lambda data: data[:saved._HEADER.size + 100], "truncated"),
    (lambda data: saved.PARTIAL + data[16:], "incomplete"),
    (lambda data: b"X" * 16 + data[16:], "not a libvirt save file"),
    (lambda data: data[:20] + struct.pack("=I", 2**31) + data[24:], "damaged"),
])
def test_a_damaged_save_file_is_refused_with_one_line(tmp_path, damage, message):
    path = str(tmp_path / "state.save")
    _save_file(path)
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(damage(data))
    with pytest.raises(saved.SavedStateError, match=message) as raised:
        saved.read_header(path)
    assert "\n" not in str(raised.value)


def test_the_jobs_definition_changes_names_disks_and_sockets_and_keeps_the_devices():
    metadata = GuestMetadata(job_id="7.srv", user="u", environment="demo", host="h", created=0)
    backing = BackingFile("/state/templates/t-1/disk.qcow2", backing=BackingFile("/img/golden.qcow2"))
    xml = saved.job_definition(
        SAVED_XML, "blahvm-7.srv-abc", "99999999-2222-3333-4444-555555555555", metadata,
        (saved.JobDisk("/pool/blahvm-7.srv-abc.qcow2", backing),),
        (("org.blahvm.agent.0", "/run/blahvm/blahvm-7.srv-abc/agent.0.sock"),
         ("org.blahvm.control", "/run/blahvm/blahvm-7.srv-abc.ctl")))
    domain = ET.fromstring(xml)
    assert domain.findtext("name") == "blahvm-7.srv-abc"
    assert domain.findtext("uuid") == "99999999-2222-3333-4444-555555555555"
    assert domain.find("genid") is not None  # libvirt makes a new one at the restore
    assert "blahvm-template-" not in xml and "<old" not in xml and "/dev/pts/3" not in xml
    disk = domain.find("devices/disk")
    assert disk.find("source").get("file") == "/pool/blahvm-7.srv-abc.qcow2"
    chain = [source.get("file") for source in disk.iter("source")]
    assert chain == ["/pool/blahvm-7.srv-abc.qcow2", "/state/templates/t-1/disk.qcow2", "/img/golden.qcow2"]
    assert [label.get("relabel") for label in disk.iter("seclabel")] == ["no", "no"]  # root's, never QEMU's
    assert disk.find("address").get("slot") == "0x04"
    paths = [channel.find("source").get("path") for channel in domain.findall("devices/channel")]
    assert paths == ["/run/blahvm/blahvm-7.srv-abc/agent.0.sock", "/run/blahvm/blahvm-7.srv-abc.ctl"]
    with pytest.raises(Exception, match="channels"):
        saved.job_definition(SAVED_XML, "blahvm-x", "99999999-2222-3333-4444-555555555555", metadata,
                             (saved.JobDisk("/p/x.qcow2", backing),), (("org.blahvm.agent.0", "/r/a.sock"),))


def test_the_template_key_changes_with_the_golden_kernel_command_line_and_shape(tmp_path, golden, keep_driver):
    config = make_config(tmp_path, golden)
    env = config.environments["demo"]
    image = verify_image(env.name, env.image, env.sha256, config.host.state_dir)
    shape = templates.Shape(Size(256 * MiB), 1)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    env = attrs.evolve(env, kernel=str(kernel), cmdline="console=ttyS0")
    key = templates.key_of(config, keep_driver, env, image, shape)
    assert key == templates.key_of(config, keep_driver, env, image, shape)
    others = [
        templates.key_of(config, keep_driver, attrs.evolve(env, sha256="0" * 64), image, shape),  # a new golden
        templates.key_of(config, keep_driver, attrs.evolve(env, cmdline="quiet"), image, shape),
        templates.key_of(config, keep_driver, env, image, templates.Shape(Size(512 * MiB), 1)),
        templates.key_of(config, keep_driver, env, image, templates.Shape(Size(256 * MiB), 2)),
    ]
    time.sleep(0.01)
    kernel.write_bytes(b"Kk")  # the same path, another kernel
    others.append(templates.key_of(config, keep_driver, env, image, shape))
    assert len({key, *others}) == 1 + len(others)
    with pytest.raises(templates.TemplateUnusable, match="no saved state yet"):
        templates.find(config, key, shape)


@pytest.mark.parametrize("change, why", [
    ({"start": "boot"}, "start: boot"),
    ({"flavour": "xen-pv"}, "xen-pv"),
    ({"network": "default"}, "MAC"),
    ({"scratch": Size(MiB)}, "scratch"),
])
def test_what_always_boots_says_why(tmp_path, golden, change, why):
    auto = attrs.evolve(make_config(tmp_path, golden).environments["demo"], start="auto")
    assert templates.why_not(auto) is None  # a working directory is no reason: it is hot-plugged
    assert why in templates.why_not(attrs.evolve(auto, **change))


@pytest.mark.parametrize("flavour", ["xen-pv", "xen-hvm"])
def test_by_default_a_flavour_without_saved_states_boots_and_its_line_says_why(tmp_path, golden, keep_driver,
                                                                              flavour):
    config = make_config(tmp_path, golden)
    assert config.environments["demo"].start == "auto"  # the default
    env = attrs.evolve(config.environments["demo"], flavour=flavour, kernel=None, initrd=None, cmdline=None)
    config = attrs.evolve(config, environments={"demo": env})
    result = prepare(config, make_job(), ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    assert result.message.endswith(f"; booted: the {flavour} flavour starts no saved states here"), result.message
    assert "boot" in dict(result.timings)
    assert teardown(config, "1234.server").outcome is Outcome.OK


def test_a_marked_maker_is_waited_for_until_it_ends_and_its_mark_is_then_a_leftover(tmp_path, golden):
    import subprocess

    config = make_config(tmp_path, golden)
    assert templates.at_work(config) is False and templates.wait_for_makers(config, 0)  # no templates dir yet
    os.makedirs(templates.root(config))
    maker = subprocess.Popen(["sleep", "600"])  # stands in for a background maker: only its pid matters here
    try:
        start = templates._start_time(maker.pid)
        mark = os.path.join(templates.root(config), f"{templates.MAKER}{maker.pid}-{start}")
        open(mark, "w").close()
        assert templates.at_work(config) and not templates.wait_for_makers(config, 0.3)
        assert templates.leftovers(config, set()) == []  # a live maker's mark is not one
        recycled = os.path.join(templates.root(config), f"{templates.MAKER}{maker.pid}-1")  # its pid, not its start
        open(recycled, "w").close()
        assert templates.leftovers(config, set()) == [recycled]
        os.unlink(recycled)
    finally:
        maker.kill()
        maker.wait()
    assert templates.wait_for_makers(config, 10) and not templates.at_work(config)
    assert templates.leftovers(config, set()) == [mark]  # it died without unmarking itself: reap's to remove
    templates.remove_leftovers(templates.leftovers(config, set()))
    assert os.listdir(templates.root(config)) == []


def test_a_template_guest_has_shared_memory_and_a_hot_plugged_share_is_the_booted_device():
    from blahvm.hypervisor import hotplug
    from blahvm.hypervisor.domain import DiskSpec, GuestSpec, SharedDir, build_domain_xml

    metadata = GuestMetadata(job_id="t", user="root", environment="demo", host="h", created=0)
    spec = GuestSpec(name="blahvm-template-0123", uuid="99999999-2222-3333-4444-555555555555", flavour="kvm",
                     memory=Size(256 * MiB), vcpus=1, disks=(DiskSpec("/p/t.qcow2"),), metadata=metadata)
    assert ET.fromstring(build_domain_xml(spec)).find("memoryBacking") is None
    backing = ET.fromstring(build_domain_xml(attrs.evolve(spec, shared_memory=True))).find("memoryBacking")
    assert (backing.find("source").get("type"), backing.find("access").get("mode")) == ("memfd", "shared")
    share = SharedDir("/run/blahvm-shares/blahvm-1-a/mnt", "blahvm-workdir", binary="/run/blahvm-shares/virtiofsd-jail")
    booted = ET.fromstring(build_domain_xml(attrs.evolve(spec, shares=(share,)))).find("devices/filesystem")
    booted.tail = None
    assert ET.canonicalize(hotplug.share_xml("kvm", share), strip_text=True) == \
        ET.canonicalize(ET.tostring(booted, encoding="unicode"), strip_text=True)
    with pytest.raises(Exception, match="cannot share"):
        hotplug.share_xml("xen-pv", share)


# -- real guests --------------------------------------------------------------------------------

PROBE = ["sh", "-c", "id -u; date +%s; cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"]
MARKER = ["sh", "-c", "echo job > /blahvm-earlier-job && sync"]
LOOK = ["sh", "-c", "test -e /blahvm-earlier-job && echo present || echo absent"]


def domain_names(config, conn):
    """This site's guests (others on this host are other tests')."""
    return {guest.name for guest in guests.list_blahvm_guests(conn) if guest.metadata.ledger == config.host.state_dir}


def _run(socket_path, argv, uid=None):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = client.run_payload(socket_path, argv, stdout=out.fileno(), stderr=err.fileno(), uid=uid,
                                  ready_timeout=READY_TIMEOUT)
        out.seek(0)
        err.seek(0)
        assert code == 0, err.read()
        return out.read().decode()


def _root_site(demo_image):
    """A real site whose environment allows root (the first job writes to /) and has a kernel and
    initrd of its own: libvirt relabels a kernel at each guest's start, and other guests on this
    host using the same file must not make that a race."""
    site = real_site(demo_image)
    config = site.__enter__()
    env = config.environments["demo"]
    where = os.path.dirname(config.host.state_dir)
    boot = {}
    for what in ("kernel", "initrd"):
        boot[what] = os.path.join(where, what)
        shutil.copyfile(getattr(env, what), boot[what])
        os.chmod(boot[what], 0o444)
    env = attrs.evolve(env, allow_root=True, start="auto", **boot)
    return site, attrs.evolve(config, environments={"demo": env})


@pytest.mark.guest
def test_real_jobs_from_one_saved_state_are_fresh_and_a_bad_state_boots(demo_image):
    site, config = _root_site(demo_image)
    try:
        env = config.environments["demo"]
        golden = verify_image(env.name, env.image, env.sha256, config.host.state_dir)
        shape = templates.Shape(env.memory, env.vcpus)
        with open_connection("qemu:///system", timeout=60) as conn:
            made = templates.make(config, conn, env, golden, shape)
        assert made is not None and made.made, made
        template = made.template
        root = templates.root(config)
        assert (os.stat(root).st_uid, os.stat(root).st_mode & 0o777) == (0, 0o711)
        assert (os.stat(template.disk).st_uid, os.stat(template.disk).st_mode & 0o777) == (0, 0o444)
        assert (os.stat(template.state).st_uid, os.stat(template.state).st_mode & 0o777) == (0, 0o600)
        print(f"template: {template.state_size} bytes of state, {template.disk_size} of disk, "
              f"made in {made.seconds:.2f}s")

        first, second = (real_job(f"tp-{uuid.uuid4().hex[:6]}", demo_image) for _ in range(2))
        outputs = []
        try:
            for job in (first, second):  # the first still runs while the second is restored
                result = prepare(config, job, ready_timeout=READY_TIMEOUT)
                assert result.outcome is Outcome.OK, result.message
                assert "restored from saved state" in result.message, result.message
                phases = dict(result.timings)
                assert "restore" in phases and "boot" not in phases, phases
                socket_path = result.socket
                host_now = time.time()
                probe = _run(socket_path, PROBE).split("\n")
                assert probe[0] == "65534"  # the job's uid, not root, unless it asks
                assert abs(int(probe[1]) - host_now) <= 2, (probe[1], host_now)
                outputs.append((probe[2], probe[3]))
                if job is first:
                    _run(socket_path, MARKER, uid=0)
                    assert _run(socket_path, LOOK, uid=0) == "present\n"
                else:
                    assert _run(socket_path, LOOK, uid=0) == "absent\n"  # nothing of the first job's
            (uuid_a, random_a), (uuid_b, random_b) = outputs
            assert uuid_a != uuid_b and random_a != random_b and len(random_a) == 64
        finally:
            for job in (first, second):
                assert teardown(config, job.job_id).outcome is Outcome.OK
        with open_connection("qemu:///system", timeout=30) as conn:
            assert domain_names(config, conn) == set() and volume_names(config, conn) == set()
        assert run_dirs(config) == set() and live_entries(config) == ()
        assert os.listdir(os.path.join(root, templates.RESTORING)) == []  # the jobs' own save files

        # a truncated state: the job boots, says why, and a maker starts again in the background
        with open(template.state, "r+b") as file:
            file.truncate(template.state_size // 2)
        third = real_job(f"tp-{uuid.uuid4().hex[:6]}", demo_image)
        result = prepare(config, third, ready_timeout=READY_TIMEOUT)
        try:
            assert result.outcome is Outcome.OK, result.message
            assert "booted: its state.save changed since it was saved; making one" in result.message, result.message
            assert "boot" in dict(result.timings) and "restore" not in dict(result.timings)
            assert _run(result.socket, ["id", "-u"]) == "65534\n"
            # kill -9 the maker once its guest exists, then reap: nothing of it is left
            maker_guest = templates.guest_name(template.key)
            deadline = time.monotonic() + 60
            with open_connection("qemu:///system", timeout=30) as conn:
                while guests.domain_state(conn, maker_guest) is None:
                    assert time.monotonic() < deadline, "no template maker started"
                    time.sleep(0.1)
            (scratch,) = [name for name in os.listdir(root) if name.startswith(templates.MAKING)]
            os.kill(int(scratch.split("-")[-2]), signal.SIGKILL)  # .making-t-<key>-<pid>-<start>
        finally:
            assert teardown(config, third.job_id).outcome is Outcome.OK
        deadline = time.monotonic() + 10
        while any(name.startswith(templates.MAKING) for name in os.listdir(root)) and \
                templates.being_made(config) and time.monotonic() < deadline:
            time.sleep(0.1)  # the kill is delivered
        report = reap(config)
        assert report.outcome is Outcome.OK, report.message
        with open_connection("qemu:///system", timeout=30) as conn:
            assert domain_names(config, conn) == set() and volume_names(config, conn) == set()
        assert run_dirs(config) == set() and live_entries(config) == ()
        left = sorted(name for name in os.listdir(root) if not name.endswith(".lock"))
        assert left == sorted([templates.RESTORING, "t-" + template.key])  # the damaged one waits for its successor
    finally:
        site.__exit__(None, None, None)


@pytest.mark.guest
def test_a_real_job_with_a_working_directory_is_restored_and_runs_its_script_from_it(demo_image):
    from blahvm import jobshare
    from blahvm.jobshare import jail
    from tests.test_jobfiles import assert_written_by_nobody, nobodys_directory, virtiofsd_serving, write_as_nobody
    from tests.test_lifecycle import run_captured

    site, config = _root_site(demo_image)
    try:
        env = config.environments["demo"]
        golden = verify_image(env.name, env.image, env.sha256, config.host.state_dir)
        with open_connection("qemu:///system", timeout=60) as conn:
            assert templates.make(config, conn, env, golden, templates.Shape(env.memory, env.vcpus)) is not None
        root = jobshare.share_root(config.host.run_dir)
        with nobodys_directory("job dir – ü 'x'") as workdir:
            write_as_nobody(os.path.join(workdir, "job.sh"),
                            "pwd; id -u; grep ' virtiofs ' /proc/mounts | cut -d' ' -f4 | tr , '\\n' | grep -x 'nosuid\\|nodev'\n"
                            "echo written > output.txt\n")
            job = attrs.evolve(real_job(f"tw-{uuid.uuid4().hex[:6]}", demo_image), workdir=workdir)
            try:
                result = prepare(config, job, ready_timeout=READY_TIMEOUT)
                assert result.outcome is Outcome.OK, result.message
                assert "restored from saved state" in result.message, result.message
                phases = dict(result.timings)
                assert {"restore", "share"} <= set(phases) and "boot" not in phases, phases
                print(f"restored with a working directory: {phases}")
                served = jail.served(root, result.guest)  # the jailed virtiofsd, as for a boot
                assert served is not None and served[1]["uid_map"] == "65534 65534 1"
                code, out, err = run_captured(config, job, ["sh", "job.sh"])
                assert (code, out.decode()) == (0, f"{workdir}\n65534\nnosuid\nnodev\n"), err
            finally:
                done = teardown(config, job.job_id)
            assert done.outcome is Outcome.OK, done.message
            assert_written_by_nobody(workdir, "output.txt", "written\n")
        assert virtiofsd_serving(root) == [] and jobshare.shared_mounts(root) == []
        assert jobshare.leftovers(root, set()) == []
        with open_connection("qemu:///system", timeout=30) as conn:
            assert domain_names(config, conn) == set() and volume_names(config, conn) == set()
        assert run_dirs(config) == set() and live_entries(config) == ()
    finally:
        site.__exit__(None, None, None)


@pytest.mark.guest
def test_a_background_maker_whose_site_is_removed_stops_cleans_up_and_makes_nothing_again(demo_image):
    from blahvm.lifecycle._common import clone_pool

    site, config = _root_site(demo_image)
    where = os.path.dirname(config.host.state_dir)
    env = config.environments["demo"]
    shape = templates.Shape(env.memory, env.vcpus)
    try:
        golden = verify_image(env.name, env.image, env.sha256, config.host.state_dir)
        with open_connection("qemu:///system", timeout=60) as conn:
            clone_pool(config, conn)  # as the prepare that started the maker had it
            name = templates.guest_name(templates.key_of(config, conn, env, golden, shape))
            pid = templates.make_in_background(config, env, shape)
            deadline = time.monotonic() + 60
            while guests.domain_state(conn, name) is None:  # its guest boots
                assert time.monotonic() < deadline and templates._alive(pid), "the maker started no guest"
                time.sleep(0.1)
    finally:
        site.__exit__(None, None, None)  # reap leaves a live maker's guest alone; then pool and dirs go
    deadline = time.monotonic() + 60
    while templates._alive(pid):
        assert time.monotonic() < deadline, "the maker did not stop once its site was removed"
        time.sleep(0.1)
    with open_connection("qemu:///system", timeout=30) as conn:
        assert guests.domain_state(conn, name) is None
        pools = [pool.name() for pool in conn.raw.listAllStoragePools(0)]
    assert config.hypervisor.pool not in pools and not os.path.exists(where)  # nothing made again
