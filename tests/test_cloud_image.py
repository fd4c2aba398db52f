"""The stock-like cloud image (``blahvm image build-demo --cloud-init``): its pieces (the MBR, the
host's Debian archive), what the built disk holds (a bootloader, cloud-init looking for NoCloud only,
no blahvm, no password, no key) and the entry it prints, which a site config accepts as it is.

The ``cloud_image`` session fixture (tests/fixtures_image.py) builds it once per machine; the real
boot with a job's seed is tests/test_cloud_guest.py.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import struct
import subprocess

import pytest
import yaml

from blahvm.cli import image as image_cli
from blahvm.config import parse_config
from blahvm.image import cloud, demo
from blahvm.image.debs import sha256_of
from blahvm.image.errors import ImageBuildError

# -- the partition table -----------------------------------------------------------------------------


def entries(sector: bytes):
    return [struct.unpack_from("<B3sB3sII", sector, 446 + 16 * index) for index in range(4)]


def test_partition_table_holds_the_boot_code_signature_and_lba_partitions():
    code = bytes(range(200)) * 2 + b"\x01" * 40  # 440 bytes
    sector = cloud.partition_table(code, [(0x0E, 2048, 4096, True), (0x83, 6144, 100000, False)], 0xDEADBEEF)
    assert len(sector) == 512 and sector[:440] == code and sector[510:] == b"\x55\xaa"
    assert struct.unpack_from("<I", sector, 440) == (0xDEADBEEF,)
    (boot, _, kind, _, first, count), (root, _, kind2, _, first2, count2), *empty = entries(sector)
    assert (boot, kind, first, count) == (0x80, 0x0E, 2048, 4096)
    assert (root, kind2, first2, count2) == (0, 0x83, 6144, 100000)
    assert all(entry == (0, b"\0\0\0", 0, b"\0\0\0", 0, 0) for entry in empty)


@pytest.mark.parametrize(
    "code, partitions",
    [
        (b"\0" * 441, []),
        (b"", [(0x83, 1, 1, False)] * 5),
        (b"", [(0x83, 0, 10, False)]),
        (b"", [(0x83, 2048, 2**32, False)]),
    ],
)
def test_partition_table_refuses_what_an_mbr_cannot_hold(code, partitions):
    with pytest.raises(ValueError):
        cloud.partition_table(code, partitions, 0)


# -- the host's Debian archive -------------------------------------------------------------------------

INDEXTARGETS = """\
http://mirror.example.org/debian/ bookworm main Debian
http://mirror.example.org/debian/ bookworm contrib Debian
http://mirror.example.org/debian/ bookworm main Debian
http://mirror.example.org/debian-security/ bookworm-security main Debian
http://mirror.example.org/debian/ bookworm-updates main Debian
http://mirror.example.org/debian/ bookworm-backports main Debian
http://mirror.example.org/debian/ trixie main Debian
https://packages.example.com/apt/ bookworm main Example
http://evil.example.org/x]y bookworm main Debian
"""


def test_the_image_comes_from_the_hosts_debian_archives_only():
    assert cloud.debian_sources(INDEXTARGETS) == [
        "deb http://mirror.example.org/debian/ bookworm main contrib",  # the suite first: it names the mirror
        "deb http://mirror.example.org/debian-security/ bookworm-security main",
        "deb http://mirror.example.org/debian/ bookworm-updates main",
    ]


def test_a_host_without_a_debian_12_archive_is_told_what_to_do():
    with pytest.raises(ImageBuildError, match="knows no Debian bookworm archive: run `apt-get update`"):
        cloud.debian_sources("https://packages.example.com/apt/ bookworm main Example\n")


def test_the_demo_images_key_does_not_cover_the_cloud_builder():
    # a change to the cloud builder must not rebuild the demo image (and its templates)
    assert "cloud" not in demo.KEY_MODULES and "cloud" in cloud.KEY_MODULES


# -- the built image -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_disk(cloud_image, tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("cloud") / "disk.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", cloud_image.image, raw], check=True)
    with open(raw, "rb") as stream:
        sector = stream.read(512)
    return raw, sector


def debugfs(raw_disk, request: str) -> subprocess.CompletedProcess:
    raw, sector = raw_disk
    first = entries(sector)[1][4]
    return subprocess.run(["debugfs", "-R", request, f"{raw}?offset={first * 512}"],
                          capture_output=True, text=True, check=True)


def in_root(raw_disk, request: str) -> str:
    return debugfs(raw_disk, request).stdout


def names_in(raw_disk, directory: str) -> set:
    """The names in ``directory`` (debugfs ``ls -p``: /inode/mode/uid/gid/name/size/ per line)."""
    return {line.split("/")[5] for line in in_root(raw_disk, f"ls -p {directory}").splitlines() if line.count("/") >= 6}


def exists(raw_disk, path: str) -> bool:
    return "File not found" not in debugfs(raw_disk, f"stat {path}").stderr


def test_the_golden_is_roots_read_only_standalone_and_its_manifest_holds(cloud_image):
    status = os.stat(cloud_image.image)
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (0, 0, 0o444)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", cloud_image.image],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert sha256_of(cloud_image.image) == cloud_image.sha256
    with open(os.path.join(cloud_image.directory, cloud.MANIFEST)) as stream:
        manifest = json.load(stream)
    assert manifest["key"] == cloud_image.key == cloud.image_key()
    assert {"cloud-init", "systemd-sysv", "python3"} <= set(manifest["packages"])
    assert cloud_image.python.startswith("3.11.") and cloud_image.cloud_init.startswith("22.4")


def test_the_disk_boots_by_itself_through_syslinux(raw_disk):
    raw, sector = raw_disk
    with open(cloud.SYSLINUX_MBR, "rb") as stream:
        assert sector[:440] == stream.read(440)
    (boot, _, kind, _, first, count), (root, _, kind2, _, first2, _), *_ = entries(sector)
    assert (boot, kind, root, kind2) == (0x80, 0x0E, 0, 0x83) and first2 == first + count
    fat = f"{raw}@@{first * 512}"
    listing = subprocess.run(["mdir", "-a", "-b", "-i", fat, "::"], capture_output=True, text=True, check=True)
    assert {"::/vmlinuz", "::/initrd.img", "::/syslinux.cfg", "::/ldlinux.sys", "::/ldlinux.c32"} <= set(
        listing.stdout.split()
    )
    config = subprocess.run(["mtype", "-i", fat, "::syslinux.cfg"], capture_output=True, text=True, check=True)
    assert f"APPEND {cloud.CMDLINE}" in config.stdout
    assert "console=ttyS0" in cloud.CMDLINE and f"LABEL={cloud.ROOT_LABEL}" in in_root(raw_disk, "cat /etc/fstab")


def test_cloud_init_looks_for_nocloud_only_and_nothing_waits_for_a_network(raw_disk):
    settings = yaml.safe_load(in_root(raw_disk, "cat /etc/cloud/cloud.cfg.d/90_blahvm.cfg"))
    assert settings["datasource_list"] == ["NoCloud", "None"]
    masked = in_root(raw_disk, "stat /etc/systemd/system/systemd-networkd-wait-online.service")
    assert 'Fast link dest: "/dev/null"' in masked
    wanted = {f"{target}/{name}" for target in ("timers.target.wants", "multi-user.target.wants")
              for name in names_in(raw_disk, f"/etc/systemd/system/{target}")}
    assert wanted & set(cloud.DISABLED_UNITS) == set() and "multi-user.target.wants/." in wanted


def test_the_image_holds_no_agent_no_password_and_no_key(raw_disk):
    assert exists(raw_disk, "/usr/lib/python3") and not exists(raw_disk, "/usr/lib/blahvm")
    for line in in_root(raw_disk, "cat /etc/shadow").splitlines():
        name, password = line.split(":")[:2]
        assert password in ("*", "!", "!*"), f"{name} has a password"
    assert ".profile" in names_in(raw_disk, "/root") and names_in(raw_disk, "/root/.ssh") <= {".", ".."}
    assert not exists(raw_disk, "/etc/ssh") and not exists(raw_disk, "/usr/sbin/sshd")
    assert in_root(raw_disk, "cat /etc/machine-id") == ""  # each guest makes its own
    assert in_root(raw_disk, "cat /etc/hostname") == "localhost\n"  # not the build host's


# -- the command line --------------------------------------------------------------------------------------


def test_cli_prints_an_entry_a_site_config_takes_as_it_is(cloud_image, capsys):
    parser = argparse.ArgumentParser(prog="blahvm")
    image_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["image", "build-demo", "--cloud-init", "--dest", os.path.dirname(cloud_image.directory)])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    assert f"cloud image: reusing {cloud_image.directory}" in captured.err
    entry_lines = cloud_image.environment_yaml().splitlines()
    assert captured.out.splitlines()[-len(entry_lines):] == entry_lines
    site = "environments:\n" + "".join("  " + line + "\n" for line in entry_lines)
    environment = parse_config(site, "site.yaml").environments["cloud"]
    assert (environment.image, environment.sha256) == (cloud_image.image, cloud_image.sha256)
    assert environment.context == "cloud-init" and environment.kernel is None and environment.initrd is None
    assert environment == cloud_image.environment("cloud")  # the Python API's entry is the printed one


def test_cli_cloud_build_failure_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    parser = argparse.ArgumentParser(prog="blahvm")
    image_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["image", "build-demo", "--cloud-init", "--dest", str(blocker / "sub")])
    assert args.run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blahvm image build-demo: ")
