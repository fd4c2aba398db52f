"""Domain XML: golden files per flavour, libvirt's RelaxNG schema, metadata round-trip, safe names.

Regenerate the golden files after an intended change with
``BLAHVM_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_domain_xml.py`` and review the diff.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.hypervisor.domain import (
    BackingFile,
    DiskSpec,
    GuestMetadata,
    GuestSpec,
    SharedDir,
    build_domain_xml,
    guest_uuid,
    read_metadata,
)
from blahvm.hypervisor.errors import MetadataError, SpecError
from blahvm.hypervisor.naming import SAFE_NAME, guest_name
from blahvm.model import Outcome
from blahvm.quantities import Size

lxml_etree = pytest.importorskip("lxml.etree")

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
SCHEMA = pathlib.Path("/usr/share/libvirt/schemas/domain.rng")
REGENERATE = os.environ.get("BLAHVM_REGENERATE_GOLDEN") == "1"

META = GuestMetadata(
    job_id="4711[3]",
    user="cms001",
    environment="slc4",
    host="node17.example.org",
    created=1700000000,
    vo="cms",
    name="my <analysis> & \"friends\"",
)


@pytest.fixture(scope="module")
def schema():
    if not SCHEMA.exists():
        pytest.skip(f"libvirt's schema {SCHEMA} is absent (install libvirt-daemon or libvirt-clients)")
    return lxml_etree.RelaxNG(file=str(SCHEMA))


def assert_schema_valid(schema, xml: str) -> None:
    document = lxml_etree.fromstring(xml.encode("utf-8"))
    assert schema.validate(document), str(schema.error_log)


def spec(**changes) -> GuestSpec:
    name = guest_name(META.job_id)
    values = dict(
        name=name,
        uuid=guest_uuid(name),
        flavour="kvm",
        memory=Size.parse("256MiB"),
        vcpus=1,
        disks=(DiskSpec("/var/lib/blahvm/clones/" + name + ".qcow2"),),
        metadata=META,
    )
    values.update(changes)
    return GuestSpec(**values)


RUN = "/run/blahvm/4711_3_"
CASES = {
    "kvm-tcg-direct-kernel": spec(
        flavour="kvm",
        domain_type="qemu",
        disks=(
            DiskSpec("/var/lib/blahvm/clones/a.qcow2", backing=BackingFile("/var/lib/blahvm/images/g.raw", "raw")),
            DiskSpec("/var/lib/blahvm/clones/a-scratch.qcow2"),
        ),
        kernel="/var/lib/blahvm/images/vmlinuz",
        initrd="/var/lib/blahvm/images/initrd.img",
        cmdline="console=ttyS0 panic=-1 root=/dev/vda",
        agent_sockets=(RUN + "/agent.0.sock", RUN + "/agent.1.sock"),
        control_socket=RUN + ".ctl",
        network="vo-cms",
        serial_log=RUN + "/console.log",
    ),
    "kvm-hw-disk-boot": spec(flavour="kvm", domain_type="kvm", agent_sockets=(RUN + "/agent.0.sock",)),
    "xen-pv-pygrub": spec(
        flavour="xen-pv",
        bootloader="/usr/lib/xen-4.17/bin/pygrub",
        memory=Size.parse("2GiB"),
        vcpus=2,
        agent_sockets=(RUN + "/agent.0.sock",),
        control_socket=RUN + ".ctl",
        network="vo-cms",
    ),
    "xen-pv-kernel": spec(
        flavour="xen-pv",
        disks=(DiskSpec("/var/lib/blahvm/clones/a.img", format="raw"),),
        kernel="/var/lib/blahvm/images/vmlinuz-2.6.9-xenU",
        cmdline="root=/dev/xvda1 ro",
        agent_sockets=(RUN + "/agent.0.sock",),
    ),
    "xen-hvm": spec(flavour="xen-hvm", agent_sockets=(RUN + "/agent.0.sock",)),
    "kvm-cloud-init-seed": spec(  # a stock cloud image: boots its own kernel, cloud-init reads the seed
        flavour="kvm",
        domain_type="qemu",
        disks=(DiskSpec("/var/lib/blahvm/clones/a.qcow2", backing=BackingFile("/var/lib/blahvm/images/d.qcow2")),),
        seed="/var/lib/blahvm/clones/a-seed.iso",
        agent_sockets=(RUN + "/agent.0.sock",),
        control_socket=RUN + ".ctl",
    ),
    "kvm-tcg-workdir-share": spec(
        flavour="kvm",
        domain_type="qemu",
        kernel="/var/lib/blahvm/images/vmlinuz",
        initrd="/var/lib/blahvm/images/initrd.img",
        cmdline="console=ttyS0 panic=-1 blahvm.workdir=2f686f6d652f636d733030312f6a6f62",
        agent_sockets=(RUN + "/agent.0.sock",),
        control_socket=RUN + ".ctl",
        shares=(SharedDir("/run/blahvm-shares/4711_3_/my job's <dir> & ü", "blahvm-workdir",
                          binary="/run/blahvm-shares/virtiofsd-jail"),),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_golden_file(case):
    xml = build_domain_xml(CASES[case])
    golden = GOLDEN_DIR / f"{case}.xml"
    if REGENERATE:
        golden.write_text(xml)
    assert golden.exists(), f"{golden} missing: run with BLAHVM_REGENERATE_GOLDEN=1"
    assert xml == golden.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_is_valid_against_libvirt_schema(schema, case):
    assert_schema_valid(schema, build_domain_xml(CASES[case]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_guest_ends_on_any_exit_and_has_acpi(case):
    root = lxml_etree.fromstring(build_domain_xml(CASES[case]).encode())
    assert root.find("features/acpi") is not None
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"
    assert read_metadata(build_domain_xml(CASES[case])) == META


def test_flavour_specifics():
    kvm = lxml_etree.fromstring(build_domain_xml(CASES["kvm-tcg-direct-kernel"]).encode())
    assert kvm.get("type") == "qemu"
    assert kvm.find("devices/memballoon").get("model") == "none"
    assert [t.get("dev") for t in kvm.iterfind("devices/disk/target")] == ["vda", "vdb"]
    assert [t.get("name") for t in kvm.iterfind("devices/channel/target")] == [
        "org.blahvm.agent.0",
        "org.blahvm.agent.1",
        "org.blahvm.control",
    ]
    assert kvm.find("devices/serial/source").get("path") == RUN + "/console.log"
    hw = lxml_etree.fromstring(build_domain_xml(CASES["kvm-hw-disk-boot"]).encode())
    assert hw.get("type") == "kvm" and hw.find("os/boot").get("dev") == "hd"
    assert hw.find("devices/serial").get("type") == "pty"

    pv = lxml_etree.fromstring(build_domain_xml(CASES["xen-pv-pygrub"]).encode())
    assert pv.get("type") == "xen"
    assert pv.findtext("bootloader") == "/usr/lib/xen-4.17/bin/pygrub"
    assert pv.find("os/type").get("machine") == "xenpv" and pv.findtext("os/type") == "linux"
    assert pv.find("devices/disk/target").attrib == {"dev": "xvda", "bus": "xen"}
    assert pv.find("devices/console/target").get("type") == "xen"
    assert pv.find("devices/channel/target").get("type") == "xen"
    assert pv.find("devices/memballoon") is None

    hvm = lxml_etree.fromstring(build_domain_xml(CASES["xen-hvm"]).encode())
    assert hvm.find("os/type").get("machine") == "xenfv"
    assert hvm.findtext("os/loader").endswith("hvmloader")


def test_user_text_cannot_inject_elements():
    hostile = "</blahvm:user><evil/><blahvm:user>"
    meta = GuestMetadata(job_id="1", user=hostile, environment="e", host="h", created=0, name="]]>&x;")
    xml = build_domain_xml(spec(metadata=meta))
    root = lxml_etree.fromstring(xml.encode())
    assert root.find(".//evil") is None
    assert read_metadata(xml) == meta


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(name="../etc/passwd"), "not a safe guest or volume name"),
        (dict(name="blahvm x"), "not a safe guest or volume name"),
        (dict(uuid="nope"), "is not a UUID"),
        (dict(flavour="vmware"), "flavour 'vmware'"),
        (dict(vcpus=0), "vcpus"),
        (dict(memory=Size(1000)), "less than 1MiB"),
        (dict(disks=()), "at least one DiskSpec"),
        (dict(kernel="vmlinuz"), "absolute path"),
        (dict(kernel="/boot/vmlinuz", cmdline="a\nb"), "one line"),
        (dict(cmdline="quiet"), "needs a kernel"),
        (dict(bootloader="/usr/bin/pygrub"), "xen-pv flavour only"),
        (dict(domain_type="auto"), "domain type 'auto'"),
        (dict(network="net'work"), "plain libvirt name"),
        (dict(agent_sockets=("/run/a\x00b",)), "control characters"),
        (dict(shares=("/home/u",)), "SharedDir values"),
        (dict(shares=(SharedDir("/a", "t"), SharedDir("/b", "t"))), "not distinct"),
    ],
)
def test_bad_spec_is_a_one_line_spec_error(changes, message):
    with pytest.raises(SpecError, match=re.escape(message)) as caught:
        spec(**changes)
    assert "\n" not in str(caught.value)
    assert caught.value.outcome is Outcome.FAIL_JOB


@pytest.mark.parametrize(
    "source, tag, message",
    [
        ("home/u", "blahvm-workdir", "absolute path"),
        ("/home/u\nx", "blahvm-workdir", "control characters"),
        ("/home/u", "", "share tag"),
        ("/home/u", "a" * 37, "share tag"),
        ("/home/u", "a'b", "share tag"),
    ],
)
def test_bad_share_is_a_spec_error(source, tag, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        SharedDir(source, tag)


def test_share_brings_the_shared_memfd_backing_and_nothing_else_does():
    shared = lxml_etree.fromstring(build_domain_xml(CASES["kvm-tcg-workdir-share"]).encode())
    assert shared.find("memoryBacking/source").get("type") == "memfd"
    assert shared.find("memoryBacking/access").get("mode") == "shared"
    (filesystem,) = shared.iterfind("devices/filesystem")
    assert (filesystem.get("type"), filesystem.get("accessmode")) == ("mount", "passthrough")
    assert filesystem.find("driver").get("type") == "virtiofs"
    assert filesystem.find("source").get("dir") == "/run/blahvm-shares/4711_3_/my job's <dir> & ü"
    assert filesystem.find("target").get("dir") == "blahvm-workdir"
    plain = lxml_etree.fromstring(build_domain_xml(CASES["kvm-hw-disk-boot"]).encode())
    assert plain.find("memoryBacking") is None and plain.find("devices/filesystem") is None


@pytest.mark.parametrize("flavour", ["xen-pv", "xen-hvm"])
def test_xen_guests_refuse_a_share(flavour):
    xen = spec(flavour=flavour, shares=(SharedDir("/home/u", "blahvm-workdir"),))
    with pytest.raises(SpecError, match=f"a {flavour} guest cannot share a host directory") as caught:
        build_domain_xml(xen)
    assert "\n" not in str(caught.value) and caught.value.outcome is Outcome.FAIL_JOB


def test_bad_disk_format():
    with pytest.raises(SpecError, match="disk format 'vmdk'"):
        DiskSpec("/a.vmdk", format="vmdk")


def test_xen_hvm_has_at_most_four_ide_disks():
    disks = tuple(DiskSpec(f"/d{i}.qcow2") for i in range(5))
    with pytest.raises(SpecError, match="at most 4"):
        build_domain_xml(spec(flavour="xen-hvm", disks=disks))


def test_read_metadata_of_a_foreign_domain_is_none():
    assert read_metadata("<domain type='qemu'><name>other</name></domain>") is None
    assert read_metadata("<domain><metadata><x:y xmlns:x='urn:x'/></metadata></domain>") is None


def test_read_metadata_of_damaged_blahvm_metadata_raises():
    ns = "https://blahvm.org/xmlns/job/1"
    with pytest.raises(MetadataError, match="lacks"):
        read_metadata(f"<domain><metadata><b:job xmlns:b='{ns}'><b:id>1</b:id></b:job></metadata></domain>")
    with pytest.raises(MetadataError, match="does not parse"):
        read_metadata("<domain>")


def test_guest_names_are_safe_distinct_and_stable():
    assert guest_name("4711[3]") == guest_name("4711[3]")
    assert guest_name("4711[3]").startswith("blahvm-4711_3_-")
    assert guest_name("4711[3]") != guest_name("4711(3)")  # same sanitised text, different hash
    assert SAFE_NAME.match(guest_name("../../" + "x" * 500))
    with pytest.raises(SpecError, match="empty"):
        guest_name("")


# -- properties --------------------------------------------------------------------------------

# Surrogates too: job names read from the environment with surrogateescape carry them.
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=60)
optional_text = st.none() | any_text


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(job_id=any_text.filter(bool), user=any_text, vo=optional_text, name=optional_text, env=any_text)
def test_any_user_text_gives_valid_xml_roundtrip_and_safe_name(schema, job_id, user, vo, name, env):
    meta = GuestMetadata(
        job_id=job_id, user=user, environment=env, host="node1", created=1, vo=vo, name=name
    )
    guest = guest_name(job_id)
    assert SAFE_NAME.match(guest) and guest.startswith("blahvm-")
    for flavour in ("kvm", "xen-pv"):
        xml = build_domain_xml(spec(name=guest, flavour=flavour, metadata=meta))
        assert_schema_valid(schema, xml)
        assert read_metadata(xml) == meta


def test_building_xml_does_not_load_libvirt():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import blahvm.hypervisor.domain, blahvm.hypervisor.images, blahvm.hypervisor.kvm\n"
        "import blahvm.hypervisor.storage, blahvm.hypervisor.guests\n"
        "assert 'libvirt' not in sys.modules, 'libvirt was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
