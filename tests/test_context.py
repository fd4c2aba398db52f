"""``context: cloud-init``: the site's ``user_data:`` checked with file and line, each job's NoCloud seed
read back from its ISO image, the seed attached to the guest as a read-only cdrom, and the seed volume
made and removed with the guest (prepare, teardown, reap) on libvirt's test:///default driver. The one
real boot of a stock cloud image with its seed is in the cloud-init image's own test."""

from __future__ import annotations

import base64
import gzip
import os
import xml.etree.ElementTree as ET

import attrs
import pytest
import yaml

from blahvm.config import ConfigError, parse_config
from blahvm.config.cloud_config import AGENT_UNIT, AGENT_UNIT_PATH, OWNED, canonical
from blahvm.config.dump import dump_config
from blahvm.context import SEED_LABEL, JobContext, make_seed, read_seed, seed_files, user_data
from blahvm.context.cloudinit import agent_source
from blahvm.hypervisor import naming
from blahvm.image.guest_init import AGENT_PATH, AGENT_PORTS
from blahvm.ledger import Ledger
from blahvm.lifecycle import prepare, reap, teardown
from blahvm.lifecycle._common import CLOUD_INIT_READY_TIMEOUT, DEFAULT_READY_TIMEOUT, ready_timeout_of
from blahvm.model import Outcome
from blahvm.quantities import Duration
from tests.test_lifecycle import (
    assert_nothing_left,
    guest_of,
    live_entries,
    make_config,
    make_job,
    volume_names,
)

SITE = """\
environments:
  debian:
    image: /var/lib/blahvm/images/debian.qcow2
    flavour: kvm
    memory: 2GiB
    vcpus: 2
    context: cloud-init
    user_data:
{additions}
"""

CVMFS = """\
      write_files:
        - path: /etc/cvmfs/default.local
          content: |
            CVMFS_REPOSITORIES=cms.cern.ch
            CVMFS_HTTP_PROXY='http://squid:3128'
          permissions: '0644'
      packages: [cvmfs, [cvmfs-config, '2.11']]
      mounts:
        - [cms.cern.ch, /cvmfs/cms.cern.ch, cvmfs, 'defaults,_netdev,nodev']
      runcmd:
        - [cvmfs_config, setup]
        - echo "site's own shell line" > /etc/motd
"""


def problems_of(text: str) -> list:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "site.yaml")
    return [str(problem) for problem in caught.value.problems]


def context(**changes) -> JobContext:
    values = dict(instance_id="blahvm-7-0a1b2c3d-1234abcd", hostname="blahvm-7-0a1b2c3d", user="alice",
                  group="physics", uid=1001, gid=2002)
    values.update(changes)
    return JobContext(**values)


def cloud_config(text: str) -> dict:
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


# -- the site's additions in the config ---------------------------------------------------------


def test_a_sites_additions_load_and_dump_back():
    config = parse_config(SITE.format(additions=CVMFS), "site.yaml")
    environment = config.environments["debian"]
    assert environment.context == "cloud-init"
    assert yaml.safe_load(environment.user_data)["mounts"][0][1] == "/cvmfs/cms.cern.ch"
    assert parse_config(dump_config(config)) == config


def test_a_malformed_addition_is_refused_with_file_line_and_key():
    additions = """\
      users: [debian]
      packges: [cvmfs]
      runcmd: echo hi
      bootcmd:
        - []
        - [modprobe, 7]
      write_files:
        - content: no path
        - path: relative/file
        - path: /etc/x
          content: 3
        - path: /etc/y
          content: "a\\0b"
        - path: /etc/z
          encoding: b64
          content: eA==
        - path: /usr/lib/blahvm/agent.py
        - path: /etc/w
          permissions: 0644
      mounts: [[only-one]]
"""
    assert problems_of(SITE.format(additions=additions)) == [
        "site.yaml:9: environments.debian.user_data.users: blahvm owns 'users': blahvm makes the job's user "
        "(and no other)",
        "site.yaml:10: environments.debian.user_data.packges: unknown or unsupported cloud-config key (did you "
        "mean 'packages'?); a site may add: write_files, runcmd, bootcmd, packages, package_update, "
        "package_upgrade, mounts, timezone",
        "site.yaml:11: environments.debian.user_data.runcmd: expected a list, got 'echo hi'",
        "site.yaml:13: environments.debian.user_data.bootcmd[0]: an empty command",
        "site.yaml:14: environments.debian.user_data.bootcmd[1][1]: expected text, got 7 (a number); quote it",
        "site.yaml:16: environments.debian.user_data.write_files[0]: a write_files entry needs a path",
        "site.yaml:17: environments.debian.user_data.write_files[1].path: 'relative/file' must be an absolute "
        "path without '..'",
        "site.yaml:19: environments.debian.user_data.write_files[2].content: expected text, got 3 (a number); "
        "quote it",
        "site.yaml:21: environments.debian.user_data.write_files[3].content: contains control characters (text "
        "only: tabs and line ends are fine)",
        "site.yaml:23: environments.debian.user_data.write_files[4].encoding: unknown key; known keys: path, "
        "content, permissions, owner, append, defer; give the content as text",
        "site.yaml:25: environments.debian.user_data.write_files[5].path: '/usr/lib/blahvm/agent.py' is "
        "blahvm's own (the agent and its unit)",
        "site.yaml:27: environments.debian.user_data.write_files[6].permissions: expected octal text such as "
        "'0644' (quoted), got 420 (a number)",
        "site.yaml:28: environments.debian.user_data.mounts[0]: a mount is a list of 2 to 6 fstab fields: "
        "[WHAT, WHERE, TYPE, OPTIONS, DUMP, PASS]",
    ]


@pytest.mark.parametrize("key", sorted(OWNED))
def test_every_key_blahvm_owns_is_refused(key):
    (problem,) = problems_of(SITE.format(additions=f"      {key}: x"))
    assert problem.startswith(f"site.yaml:9: environments.debian.user_data.{key}: blahvm owns {key!r}")


def test_user_data_needs_cloud_init_and_a_static_guest_takes_none():
    assert problems_of("environments: {e: {image: /i, flavour: kvm, memory: 1G, vcpus: 1, user_data: {}}}") == [
        "site.yaml:1: environments.e.user_data: user_data is for environments with context: cloud-init"]
    assert problems_of("environments: {e: {image: /i, flavour: kvm, memory: 1G, vcpus: 1, context: cloud-init, "
                       "guests: [g1]}}") == [
        "site.yaml:1: environments.e.context: a static guest is not made for each job: it takes no per-job seed"]
    assert problems_of("environments: {e: {image: /i, flavour: kvm, memory: 1G, vcpus: 1, context: cloudinit}}") == [
        "site.yaml:1: environments.e.context: 'cloudinit' is not one of none, cloud-init (did you mean "
        "'cloud-init'?)"]


def test_the_wait_for_the_agent_is_the_environments_or_the_default_of_its_kind():
    config = parse_config("environments: {a: {image: /i, flavour: kvm, memory: 1G, vcpus: 1},"
                          " b: {image: /i, flavour: kvm, memory: 1G, vcpus: 1, context: cloud-init},"
                          " c: {image: /i, flavour: kvm, memory: 1G, vcpus: 1, context: cloud-init,"
                          " ready_timeout: 20m}}")
    assert [ready_timeout_of(config.environments[name]) for name in "abc"] == [
        DEFAULT_READY_TIMEOUT, CLOUD_INIT_READY_TIMEOUT, 1200.0]
    assert config.environments["c"].ready_timeout == Duration(1200)


# -- the seed ----------------------------------------------------------------------------------


def test_the_seed_is_a_cidata_volume_with_meta_data_and_user_data():
    site = parse_config(SITE.format(additions=CVMFS)).environments["debian"].user_data
    files = read_seed(make_seed(seed_files(context(), site)))
    assert files.pop("") == SEED_LABEL
    assert sorted(files) == ["meta-data", "user-data"]
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "blahvm-7-0a1b2c3d-1234abcd",
                                                  "local-hostname": "blahvm-7-0a1b2c3d"}
    document = cloud_config(files["user-data"].decode("utf-8"))
    assert (document["hostname"], document["preserve_hostname"], document["users"]) == ("blahvm-7-0a1b2c3d",
                                                                                       False, [])
    agent, unit, site_file = document["write_files"]
    assert (agent["path"], agent["encoding"], agent["owner"]) == (AGENT_PATH, "gz+b64", "root:root")
    assert gzip.decompress(base64.b64decode(agent["content"])) == agent_source()  # the agent, byte for byte
    assert unit["path"] == AGENT_UNIT_PATH
    assert f"ExecStart=/usr/bin/python3 {AGENT_PATH} --port {AGENT_PORTS}\n" in unit["content"]
    assert site_file["content"] == "CVMFS_REPOSITORIES=cms.cern.ch\nCVMFS_HTTP_PROXY='http://squid:3128'\n"
    # the job's group and user first (words, never a shell line), the site's commands, the agent last
    assert document["runcmd"] == [
        ["groupadd", "--gid", "2002", "physics"],
        ["useradd", "--uid", "1001", "--gid", "2002", "--no-user-group", "--no-create-home", "--home-dir", "/tmp",
         "--shell", "/bin/sh", "--comment", "blahvm job", "alice"],
        ["cvmfs_config", "setup"],
        "echo \"site's own shell line\" > /etc/motd",
        ["systemctl", "daemon-reload"],
        ["systemctl", "start", "--no-block", AGENT_UNIT],
    ]
    assert document["packages"] == ["cvmfs", ["cvmfs-config", "2.11"]]
    assert document["mounts"] == [["cms.cern.ch", "/cvmfs/cms.cern.ch", "cvmfs", "defaults,_netdev,nodev"]]
    # no password, key or sudo anywhere blahvm writes
    assert not {"chpasswd", "password", "ssh_authorized_keys", "sudo"} & set(document)


def test_a_seed_for_no_job_carries_the_agent_and_the_sites_additions_only():
    document = cloud_config(user_data(context(user=None, group=None, uid=None, gid=None)))
    assert document["runcmd"] == [["systemctl", "daemon-reload"], ["systemctl", "start", "--no-block", AGENT_UNIT]]
    assert [entry["path"] for entry in document["write_files"]] == [AGENT_PATH, AGENT_UNIT_PATH]


def test_uid_and_gid_0_are_never_made_again():
    document = cloud_config(user_data(context(uid=0, gid=0)))
    assert [command[0] for command in document["runcmd"]] == ["systemctl", "systemctl"]


@pytest.mark.parametrize("changes", [
    {"user": "alice; rm -rf /"}, {"user": "../etc"}, {"user": "Alice\n"}, {"group": "grp:x:0:"},
    {"user": "-rf"}, {"hostname": "a b"}, {"hostname": "x" * 64}, {"instance_id": "i\nd"},
    {"uid": -1}, {"gid": True}, {"uid": "1001"}, {"uid": None},
])
def test_hostile_names_and_ids_are_refused(changes):
    with pytest.raises(ValueError):
        context(**changes)


def test_hostile_site_text_stays_text():
    hostile = "'; rm -rf / #\n\"$(id)\" `id` \\ ${HOME} \u202e ünïcode\n---\n#cloud-config\n"
    site = canonical({"write_files": [{"path": "/etc/x y/'quoted'", "content": hostile}],
                      "runcmd": [["printf", "%s", hostile]]})
    document = cloud_config(user_data(context(), site))
    assert document["write_files"][2] == {"path": "/etc/x y/'quoted'", "content": hostile}
    assert ["printf", "%s", hostile] in document["runcmd"]
    assert set(document) == {"hostname", "preserve_hostname", "manage_etc_hosts", "users", "write_files", "runcmd"}


def test_a_hand_made_site_addition_cannot_set_what_blahvm_owns():
    with pytest.raises(ValueError, match="users"):
        user_data(context(), canonical({"users": [{"name": "root", "sudo": "ALL=(ALL) NOPASSWD:ALL"}]}))


def test_seed_file_names_are_plain():
    with pytest.raises(ValueError):
        make_seed({"../meta-data": b"x"})


# -- the guest: prepare, teardown and reap on test:///default -------------------------------------


def cloud_config_site(tmp_path, golden, **environment):
    image, sha = golden
    return make_config(tmp_path, (image, sha, {"context": "cloud-init", **environment}))


def test_prepare_attaches_the_seed_read_only_and_teardown_removes_it(tmp_path, golden, keep_driver):
    config = cloud_config_site(tmp_path, golden, user_data=canonical({"runcmd": [["true"]]}))
    job = make_job(uid=1001, gid=2002)
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    guest = guest_of(config, job.job_id)
    seed = naming.seed_volume_name(guest)
    assert volume_names(config, keep_driver) == {guest + ".qcow2", seed}
    (entry,) = live_entries(config)
    assert entry.volumes == (guest + ".qcow2", seed)  # recorded before it was made
    assert "seed" in dict(entry.timings)
    domain = ET.fromstring(keep_driver.raw.lookupByName(guest).XMLDesc())
    disk, seed_disk = domain.findall("./devices/disk")
    assert disk.find("source").get("file").endswith("/" + guest + ".qcow2") and disk.find("readonly") is None
    assert seed_disk.find("source").get("file").endswith("/" + seed)
    assert seed_disk.find("readonly") is not None and seed_disk.find("driver").get("type") == "raw"
    # a virtio disk, which every stock cloud kernel has (it boots from one), not a SATA or IDE cdrom
    assert (seed_disk.find("target").get("dev"), seed_disk.find("target").get("bus")) == ("vdb", "virtio")
    assert domain.find("./os/cmdline") is None  # a stock image boots its own kernel
    assert teardown(config, job.job_id).outcome is Outcome.OK
    assert_nothing_left(config, keep_driver)


def test_a_failed_prepare_leaves_no_seed(tmp_path, golden, keep_driver):
    config = cloud_config_site(tmp_path, golden)
    job = make_job()  # no uid or gid: its guest could never be told whom to run the job as
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "no uid and gid" in result.message
    assert_nothing_left(config, keep_driver)


def test_reap_removes_an_orphaned_seed(tmp_path, golden, keep_driver):
    config = cloud_config_site(tmp_path, golden)
    job = make_job(uid=1001, gid=2002)
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.OK
    with Ledger(config.host) as ledger:  # the ledger lost the job (say, moved aside after damage)
        ledger.close(job.job_id, Outcome.OK)
    report = reap(config)
    guest = guest_of(config, job.job_id)
    assert report.guests == (guest,)
    assert set(report.volumes) == {guest + ".qcow2", naming.seed_volume_name(guest)}
    assert_nothing_left(config, keep_driver)


def test_a_cloud_init_environment_may_start_from_a_saved_state_keyed_by_its_additions(tmp_path, golden,
                                                                                      keep_driver):
    from blahvm.hypervisor.images import verify_image
    from blahvm.lifecycle import templates
    from blahvm.quantities import Size

    config = cloud_config_site(tmp_path, golden, start="auto")
    environment = config.environments["demo"]
    assert templates.why_not(environment) is None
    image = verify_image(environment.name, environment.image, environment.sha256, config.host.state_dir)
    shape = templates.Shape(Size(256 * 1024**2), 1)
    keys = {templates.key_of(config, keep_driver, attrs.evolve(environment, **change), image, shape)
            for change in ({}, {"context": "none"}, {"user_data": canonical({"runcmd": [["true"]]})},
                           {"user_data": canonical({"runcmd": [["false"]]})})}
    assert len(keys) == 4  # what cloud-init made of the site's additions is in the state


def test_a_guest_restored_from_a_template_gets_the_jobs_seed_in_place_of_the_templates():
    from blahvm.hypervisor import saved
    from blahvm.hypervisor.domain import BackingFile, DiskSpec, GuestMetadata, GuestSpec, build_domain_xml
    from blahvm.quantities import Size

    template = GuestSpec(name="blahvm-template-0123", uuid="11111111-2222-3333-4444-555555555555", flavour="kvm",
                         memory=Size(256 * 1024**2), vcpus=1,
                         disks=(DiskSpec("/pool/blahvm-template-0123.qcow2", backing=BackingFile("/img/g.qcow2")),),
                         seed="/pool/blahvm-template-0123-seed.iso",
                         metadata=GuestMetadata(job_id="template", user="root", environment="e", host="h", created=1))
    metadata = GuestMetadata(job_id="7", user="alice", environment="e", host="h", created=2)
    backing = BackingFile("/state/templates/t-0123/disk.qcow2", backing=BackingFile("/img/g.qcow2"))
    xml = saved.job_definition(build_domain_xml(template), "blahvm-7-abc", "99999999-2222-3333-4444-555555555555",
                               metadata, (saved.JobDisk("/pool/blahvm-7-abc.qcow2", backing),
                                          saved.JobDisk("/pool/blahvm-7-abc-seed.iso")), ())
    disk, seed = ET.fromstring(xml).findall("devices/disk")
    assert disk.find("source").get("file") == "/pool/blahvm-7-abc.qcow2"
    assert seed.find("source").get("file") == "/pool/blahvm-7-abc-seed.iso" and seed.find("backingStore") is None
    assert seed.find("readonly") is not None and seed.find("target").get("dev") == "vdb"
    assert "template-0123-seed" not in xml


def test_a_jobs_directory_is_shared_with_no_kernel_command_line(tmp_path, golden, keep_driver):
    """The image boots its own kernel: the job's directory is pinned and shared as for any guest,
    and the agent is asked to mount it over the control port (before the bind) instead."""
    from blahvm import jobshare
    from blahvm.model import Job

    workdir = tmp_path / "job dir ü"
    workdir.mkdir()
    os.chown(workdir, 65534, 65534)
    config = cloud_config_site(tmp_path, golden)
    job = Job(job_id="77.server", user="nobody", decision=make_job().decision, uid=65534, gid=65534,
              workdir=str(workdir))
    try:
        result = prepare(config, job, ready_timeout=None)
        assert result.outcome is Outcome.OK, result.message
        domain = ET.fromstring(keep_driver.raw.lookupByName(result.guest).XMLDesc())
        assert domain.find("./devices/filesystem/target").get("dir") == "blahvm-workdir"
        assert domain.find("./os/cmdline") is None and domain.find("./os/kernel") is None
        root = jobshare.share_root(config.host.run_dir)
        assert jobshare.shared_mounts(root) == [jobshare.mount_point(root, result.guest)]
    finally:
        done = teardown(config, job.job_id)
    assert done.outcome is Outcome.OK, done.message
    assert_nothing_left(config, keep_driver)
