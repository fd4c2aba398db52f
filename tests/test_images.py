"""Golden-image checks: crafted qcow2 headers, real qemu-img images, checksums and their cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import struct
import subprocess
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.hypervisor.errors import ImageError, ImageMissing
from blahvm.hypervisor.images import (
    CACHE_FILE,
    EXT_DATA_FILE,
    HeaderError,
    ImageInfo,
    inspect_image,
    parse_qcow2_header,
    verify_image,
)
from blahvm.model import Outcome
from tests.as_user import run_as, write_at

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")
BACKING_FORMAT_EXT = 0xE2792ACA


def qcow2_bytes(
    *,
    version=3,
    size=1 << 30,
    cluster_bits=16,
    backing=b"",
    incompatible=0,
    crypt=0,
    extensions=(),
):
    """A qcow2 header written by hand, as the spec (docs/interop/qcow2.txt) lays it out."""
    header_length = 104 if version == 3 else 72
    body = b""
    for kind, data in extensions:
        body += struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)
    body += struct.pack(">II", 0, 0)
    backing_offset = header_length + len(body) if backing else 0
    header = b"QFI\xfb" + struct.pack(
        ">IQIIQIIQQIIQ",
        version,
        backing_offset,
        len(backing),
        cluster_bits,
        size,
        crypt,
        0,  # l1_size
        0,  # l1_table_offset
        0,  # refcount_table_offset
        0,  # refcount_table_clusters
        0,  # nb_snapshots
        0,  # snapshots_offset
    )
    if version == 3:
        header += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
    assert len(header) == header_length
    return header + body + backing


def write(path, data):
    path.write_bytes(data)
    return str(path)


def test_a_plain_qcow2_header_is_accepted(tmp_path):
    path = write(tmp_path / "ok.qcow2", qcow2_bytes(extensions=[(BACKING_FORMAT_EXT + 1, b"x" * 5)]))
    assert inspect_image("slc4", path) == ImageInfo(path=path, format="qcow2", virtual_size=1 << 30)
    v2 = write(tmp_path / "v2.qcow2", qcow2_bytes(version=2, size=12345 * 512))
    assert inspect_image("slc4", v2).virtual_size == 12345 * 512


@pytest.mark.parametrize(
    "header, message",
    [
        (qcow2_bytes(backing=b"/etc/shadow"), "names a backing file '/etc/shadow'"),
        (qcow2_bytes(version=2, backing=b"json:{}"), "names a backing file 'json:{}'"),
        (
            qcow2_bytes(incompatible=1 << 2, extensions=[(EXT_DATA_FILE, b"/dev/sda")]),
            "names an external data file '/dev/sda'",
        ),
        (qcow2_bytes(extensions=[(EXT_DATA_FILE, b"/etc/passwd")]), "external data file '/etc/passwd'"),
        (qcow2_bytes(incompatible=1 << 2), "external data file ''"),
        (qcow2_bytes(crypt=1), "encrypted"),
        (qcow2_bytes(incompatible=1 << 1), "marked corrupt"),
        (qcow2_bytes(incompatible=1 << 0), "not closed cleanly"),
        (qcow2_bytes(incompatible=1 << 40), "unknown incompatible qcow2 features 0x10000000000"),
        (qcow2_bytes(version=4), "damaged qcow2 header (qcow2 version 4"),
        (qcow2_bytes(cluster_bits=40), "damaged qcow2 header (cluster_bits 40"),
        (qcow2_bytes()[:110], "damaged qcow2 header (the header extensions run past"),
        (b"QFI\xfb\0\0", "damaged qcow2 header"),
        (b"KDMV" + b"\0" * 600, "is a vmdk image"),
        (b"QED\0" + b"\0" * 600, "is a qed image"),
        (b"", "is empty"),
    ],
)
def test_unsafe_or_damaged_headers_are_refused(tmp_path, header, message):
    path = write(tmp_path / "bad.img", header)
    with pytest.raises(ImageError, match=_re(message)) as caught:
        inspect_image("slc4", path)
    assert str(caught.value).startswith(f"image slc4 at {path}")
    assert "\n" not in str(caught.value)
    assert caught.value.outcome is Outcome.FAIL_JOB


def _re(text):
    return re.escape(text)


def test_missing_image_is_a_host_problem(tmp_path):
    with pytest.raises(ImageMissing, match="missing on this host") as caught:
        inspect_image("slc4", str(tmp_path / "nope.qcow2"))
    assert caught.value.outcome is Outcome.RETRY_ELSEWHERE


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is not a regular file"):
        inspect_image("slc4", str(tmp_path))
    with pytest.raises(ImageError, match="/dev/null is not a regular file"):
        inspect_image("slc4", "/dev/null")


def test_raw_is_accepted(tmp_path):
    path = write(tmp_path / "disk.raw", b"\x55" * 4096)
    assert inspect_image("slc4", path) == ImageInfo(path=path, format="raw", virtual_size=4096)


@needs_qemu_img
def test_images_made_by_qemu_img(tmp_path):
    def qemu_img(*args):
        subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)

    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, "100M")
    assert inspect_image("base", base) == ImageInfo(path=base, format="qcow2", virtual_size=100 << 20)

    overlay = str(tmp_path / "overlay.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    with pytest.raises(ImageError, match=_re(f"names a backing file {base!r}")):
        inspect_image("overlay", overlay)

    with_data_file = str(tmp_path / "external.qcow2")
    data_file = str(tmp_path / "external.data")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data_file}", with_data_file, "10M")
    with pytest.raises(ImageError, match=_re(f"names an external data file {data_file!r}")):
        inspect_image("external", with_data_file)

    raw = str(tmp_path / "disk.raw")
    qemu_img("create", "-f", "raw", raw, "10M")
    assert inspect_image("raw", raw).format == "raw"


# -- where a golden may live: root's alone -------------------------------------------------------

NOBODY = pwd.getpwnam("nobody")


@contextlib.contextmanager
def bounded(seconds=30):
    """Turn a hang (e.g. opening a FIFO that has no writer) into a failure instead of a stuck suite."""

    def expire(signum, frame):
        raise TimeoutError("the check hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _world_writable_directory(d):
    (d / "images").mkdir()
    path = write(d / "images" / "g.raw", GOOD)
    os.chmod(d / "images", 0o777)
    return path, "directory {d}/images is writable by group or others (mode 777)"


def _world_writable_ancestor(d):
    (d / "a" / "b").mkdir(parents=True)
    path = write(d / "a" / "b" / "g.raw", GOOD)
    os.chmod(d / "a", 0o757)
    return path, "directory {d}/a is writable by group or others (mode 757)"


def _group_writable_directory(d):
    (d / "images").mkdir()
    path = write(d / "images" / "g.raw", GOOD)
    os.chmod(d / "images", 0o775)
    return path, "directory {d}/images is writable by group or others (mode 775)"


def _directory_of_a_user(d):
    (d / "images").mkdir()
    path = write(d / "images" / "g.raw", GOOD)
    os.chown(d / "images", NOBODY.pw_uid, NOBODY.pw_gid)
    return path, f"directory {{d}}/images is owned by uid {NOBODY.pw_uid}, not root"


def _world_writable_image(d):
    path = write(d / "g.raw", GOOD)
    os.chmod(path, 0o666)
    return path, "it is writable by group or others (mode 666)"


def _group_writable_image(d):
    path = write(d / "g.raw", GOOD)
    os.chmod(path, 0o664)
    return path, "it is writable by group or others (mode 664)"


def _image_of_a_user(d):
    path = write(d / "g.raw", GOOD)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(path, 0o444)
    return path, f"it is owned by uid {NOBODY.pw_uid}, not root"


def _image_of_the_qemu_user(d):  # what libvirt left behind before it was told not to relabel goldens
    path = write(d / "g.raw", GOOD)
    os.chown(path, pwd.getpwnam("libvirt-qemu").pw_uid, 0)
    return path, f"it is owned by uid {pwd.getpwnam('libvirt-qemu').pw_uid}, not root"


def _symlink_to_shadow(d):
    os.symlink("/etc/shadow", d / "g.raw")
    return str(d / "g.raw"), "it is a symbolic link: name the file itself"


def _symlinked_directory_of_a_user(d):
    (d / "real").mkdir()
    write(d / "real" / "g.raw", GOOD)
    os.symlink("real", d / "link")
    os.lchown(d / "link", NOBODY.pw_uid, NOBODY.pw_gid)
    return str(d / "link" / "g.raw"), f"symbolic link {{d}}/link is owned by uid {NOBODY.pw_uid}, not root"


def _fifo(d):
    os.mkfifo(d / "g.raw", 0o644)
    return str(d / "g.raw"), "is not a regular file"


def _device(d):
    return "/dev/zero", "is not a regular file"


UNSAFE_PLACES = [
    _world_writable_directory,
    _world_writable_ancestor,
    _group_writable_directory,
    _directory_of_a_user,
    _world_writable_image,
    _group_writable_image,
    _image_of_a_user,
    _image_of_the_qemu_user,
    _symlink_to_shadow,
    _symlinked_directory_of_a_user,
    _fifo,
    _device,
]


@pytest.mark.parametrize("place", UNSAFE_PLACES, ids=lambda place: place.__name__.strip("_"))
def test_a_golden_others_could_change_is_refused_in_one_line(tmp_path, place):
    path, problem = place(tmp_path)
    shadow = os.stat("/etc/shadow")
    for check in (lambda: inspect_image("slc4", path), lambda: verify_image("slc4", path, sha256_of(GOOD),
                                                                            str(tmp_path / "state"))):
        with bounded(), pytest.raises(ImageError) as caught:
            check()
        message = str(caught.value)
        assert message.startswith(f"image slc4 at {path} ") and problem.format(d=tmp_path) in message, message
        assert "\n" not in message
        assert caught.value.outcome is Outcome.FAIL_JOB
    after = os.stat("/etc/shadow")
    assert (after.st_uid, after.st_gid, after.st_mode) == (shadow.st_uid, shadow.st_gid, shadow.st_mode)


def test_root_only_places_are_accepted(tmp_path):
    """Read-only for all, or 0644; a root-owned symlinked directory; a sticky directory like /tmp."""
    (tmp_path / "real").mkdir()
    readonly = write(tmp_path / "real" / "ro.raw", GOOD)
    os.chmod(readonly, 0o444)
    os.symlink("real", tmp_path / "link")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    in_sticky = write(sticky / "g.raw", GOOD)
    for path in (readonly, str(tmp_path / "link" / "ro.raw"), in_sticky):
        assert verify_image("slc4", path, sha256_of(GOOD), str(tmp_path / "state")).format == "raw"


@pytest.fixture
def reachable_dir():
    """A root-owned 0755 directory every parent of which QEMU's user can search (pytest's are 0700)."""
    directory = tempfile.mkdtemp(prefix="blahvm-test-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    try:
        yield pathlib.Path(directory)
    finally:
        shutil.rmtree(directory)


def test_a_golden_is_not_writable_by_the_qemu_user(reachable_dir, tmp_path):
    """Playing libvirt-qemu: a golden that passes the checks cannot be written, nor made writable."""
    path = write(reachable_dir / "g.raw", GOOD)
    verify_image("slc4", path, sha256_of(GOOD), str(tmp_path / "state"))
    assert run_as("libvirt-qemu", write_at(path, 4096, b"EVILEVIL")) == "PermissionError"
    assert run_as("libvirt-qemu", lambda: os.chmod(path, 0o666) or "chmodded") == "PermissionError"
    assert run_as("libvirt-qemu", lambda: str(len(open(path, "rb").read()))) == str(len(GOOD))  # but reads it
    assert sha256_of(pathlib.Path(path).read_bytes()) == sha256_of(GOOD)


# -- checksums -----------------------------------------------------------------------------------

GOOD = b"a golden image" * 1000


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def test_checksum_match_and_mismatch(tmp_path):
    path = write(tmp_path / "slc4.raw", GOOD)
    state = str(tmp_path / "state")
    assert verify_image("slc4", path, sha256_of(GOOD).upper(), state).format == "raw"
    wrong = "5c3e" + "0" * 60
    with pytest.raises(ImageError) as caught:
        verify_image("slc4", path, wrong, state)
    message = str(caught.value)
    assert message.startswith(
        f"image slc4 failed its sha256 check (expected 5c3e00000000..., got {sha256_of(GOOD)[:12]}...): re-import it"
    )
    assert caught.value.outcome is Outcome.FAIL_JOB
    with pytest.raises(ImageError, match="is not 64 hex digits"):
        verify_image("slc4", path, "5c3e...", state)


def test_no_checksum_configured_checks_only_the_header(tmp_path):
    path = write(tmp_path / "bad.qcow2", qcow2_bytes(backing=b"/etc/shadow"))
    with pytest.raises(ImageError, match="backing file"):
        verify_image("slc4", path, None, str(tmp_path / "state"))


def test_checksum_is_remembered_by_file_identity(tmp_path):
    path = write(tmp_path / "slc4.raw", GOOD)
    state = tmp_path / "state"
    digest = sha256_of(GOOD)
    verify_image("slc4", path, digest, str(state))
    entries = json.loads((state / CACHE_FILE).read_text())
    status = os.stat(path)
    key = f"{status.st_dev}:{status.st_ino}"
    assert entries[key] == {
        "size": len(GOOD), "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns, "sha256": digest
    }

    # The cache, not the file, answers while the identity holds: plant a different digest.
    entries[key]["sha256"] = "f" * 64
    (state / CACHE_FILE).write_text(json.dumps(entries))
    with pytest.raises(ImageError, match="got ffffffffffff"):
        verify_image("slc4", path, digest, str(state))

    # A changed file (new mtime) is hashed again.
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1))
    assert verify_image("slc4", path, digest, str(state)).format == "raw"


def test_content_changed_with_the_mtime_put_back_is_hashed_again(tmp_path):
    """What a writer of the golden did (issue 12): same size, mtime restored. ctime gives it away."""
    path = write(tmp_path / "slc4.raw", GOOD)
    state = str(tmp_path / "state")
    verify_image("slc4", path, sha256_of(GOOD), state)
    before = os.stat(path)
    with open(path, "r+b") as image:
        image.seek(4096)
        image.write(b"EVILEVIL")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(ImageError, match="failed its sha256 check") as caught:
        verify_image("slc4", path, sha256_of(GOOD), state)
    assert caught.value.outcome is Outcome.FAIL_JOB


def test_a_tampered_image_with_the_same_size_fails(tmp_path):
    path = tmp_path / "slc4.raw"
    write(path, GOOD)
    state = str(tmp_path / "state")
    verify_image("slc4", str(path), sha256_of(GOOD), state)
    with open(path, "r+b") as image:
        image.write(b"X")
    with pytest.raises(ImageError, match="failed its sha256 check"):
        verify_image("slc4", str(path), sha256_of(GOOD), state)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    path = write(tmp_path / "slc4.raw", GOOD)
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE).write_text("{not json")
    assert verify_image("slc4", path, sha256_of(GOOD), str(state)).format == "raw"
    assert json.loads((state / CACHE_FILE).read_text())


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=400))
def test_parser_never_fails_other_than_header_error(tail):
    for data in (tail, b"QFI\xfb" + tail, qcow2_bytes()[:72] + tail):
        try:
            parse_qcow2_header(data)
        except HeaderError:
            pass


@settings(max_examples=100)
@given(backing=st.binary(min_size=1, max_size=1023), version=st.sampled_from([2, 3]))
def test_any_backing_file_is_refused(tmp_path_factory, backing, version):
    path = tmp_path_factory.mktemp("img") / "x.qcow2"
    path.write_bytes(qcow2_bytes(version=version, backing=backing))
    with pytest.raises(ImageError, match="names a backing file"):
        inspect_image("x", str(path))
