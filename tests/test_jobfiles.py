"""The job's working directory inside its guest: shared with virtiofs, mounted at the same path.

Unit tests: the kernel command line encoding and the guest's decoder (run here, with the same
python3 program the guest runs), and prepare's checks on test:///default. Real guests: a job reads
its input and writes its output in the shared directory, as the job's user.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.image import guest_init
from blahvm.lifecycle import prepare, teardown
from blahvm.model import Job, Outcome
from tests.test_lifecycle import (
    assert_nothing_left,
    make_config,
    make_job,
    real_job,
    real_site,
    run_captured,
)

pytest.importorskip("libvirt")

NOBODY = 65534
READY_TIMEOUT = 120.0


def decode_in_guest(*arguments: str) -> subprocess.CompletedProcess:
    """Run the guest's decoder exactly as stage two does: ``python3 -c DECODER HEX``."""
    return subprocess.run(
        [sys.executable, "-c", guest_init.WORKDIR_DECODER, *arguments], capture_output=True, timeout=30
    )


# -- the kernel command line ------------------------------------------------------------------

# Path components: any printable text (spaces, quotes, $, non-ASCII), never control characters.
component = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1, max_size=12
).filter(lambda part: part not in (".", ".."))
workdir_paths = st.lists(component, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=40, deadline=None)
@given(path=workdir_paths)
def test_workdir_argument_round_trips_through_the_guest_decoder(path):
    argument = guest_init.workdir_argument(path)
    name, _, value = argument.partition("=")
    assert name == guest_init.WORKDIR_ARGUMENT
    assert value.isalnum() and value == value.lower()  # one word of hex: nothing a shell or kernel splits
    decoded = decode_in_guest(value)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == path.encode("utf-8")


BAD_PATHS = {
    "relative": "job/dir",
    "root": "/",
    "dot-dot": "/home/u/../root",
    "dot": "/home/./u",
    "double slash": "//home/u",
    "trailing slash": "/home/u/",
    "newline": "/home/u\nx",
    "escape": "/home/u\x1b[2J",
    "too long": "/" + "a" * guest_init.MAX_WORKDIR_BYTES,
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_host_and_guest_refuse_the_same_bad_paths(case):
    path = BAD_PATHS[case]
    with pytest.raises(ValueError):
        guest_init.workdir_argument(path)
    assert_refused(path.encode("utf-8").hex())


@pytest.mark.parametrize(
    "text",
    [
        "",  # nothing
        "2",  # odd length
        "2F686F6D65",  # upper case
        "2f68zz",  # not hex
        "2f 68",  # a space
        "$(reboot)",  # shell syntax stays text
        "2fff",  # "/\xff": not UTF-8
        "2f00",  # NUL
    ],
)
def test_guest_decoder_refuses_malformed_hex(text):
    assert_refused(text)


def test_guest_decoder_takes_exactly_one_argument():
    assert_refused("2f61", "2f62")


def assert_refused(*arguments: str) -> None:
    result = decode_in_guest(*arguments)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.startswith(b"blahvm-guest: bad job directory") and result.stderr.count(b"\n") == 1


def test_stage_two_mounts_the_decoded_path_before_the_agent_starts():
    init = guest_init.root_init(["virtio_console", "fuse", "virtiofs"])
    assert f"'{guest_init.WORKDIR_DECODER}'" in init
    mount = init.index(f"mount -t virtiofs -o nosuid,nodev {guest_init.WORKDIR_TAG} \"$workdir\"")
    assert mount < init.index(guest_init.READY_LINE) < init.index(f"python3 {guest_init.AGENT_PATH}")


# -- prepare's checks, on test:///default -----------------------------------------------------


@pytest.fixture
def job_dir(tmp_path):
    path = tmp_path / "job dir ü"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    return str(path)


def workdir_job(workdir, uid=NOBODY):
    return Job(job_id="77.server", user="nobody", decision=make_job().decision, uid=uid, gid=uid, workdir=workdir)


def test_prepare_shares_the_workdir_and_tells_the_guest_where(tmp_path, golden, keep_driver, job_dir):  # noqa: F811
    config = make_config(tmp_path, (golden[0], golden[1], {"kernel": "/boot/vmlinuz", "cmdline": "quiet"}))
    result = prepare(config, workdir_job(job_dir + "/"), ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    xml = keep_driver.raw.lookupByName(result.guest).XMLDesc()
    assert f"<source dir='{job_dir}'/>" in xml and "<target dir='blahvm-workdir'/>" in xml
    assert "<source type='memfd'/>" in xml and "<access mode='shared'/>" in xml
    assert f"<cmdline>quiet {guest_init.workdir_argument(job_dir)}</cmdline>" in xml
    teardown(config, "77.server")
    assert_nothing_left(config, keep_driver)


def test_prepare_without_a_workdir_shares_nothing(tmp_path, golden, keep_driver):  # noqa: F811
    config = make_config(tmp_path, golden)
    result = prepare(config, make_job(), ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    xml = keep_driver.raw.lookupByName(result.guest).XMLDesc()
    assert "<filesystem" not in xml and "memfd" not in xml
    teardown(config, make_job().job_id)


@pytest.mark.parametrize(
    "make, uid, kernel, message",
    [
        (lambda d: d + "/missing", NOBODY, "/boot/vmlinuz", "does not exist"),
        (lambda d: d + "/file.txt", NOBODY, "/boot/vmlinuz", "is not a directory"),
        (lambda d: d, 1000, "/boot/vmlinuz", "is owned by uid 65534, not by the job's uid 1000"),
        (lambda d: d, None, "/boot/vmlinuz", "the job has no uid"),
        (lambda d: os.path.relpath(d), NOBODY, "/boot/vmlinuz", "not a normalised absolute path"),
        (lambda d: d + "/../x", NOBODY, "/boot/vmlinuz", "not a normalised absolute path"),
        (lambda d: d, NOBODY, None, "boots its own kernel"),
    ],
)
def test_a_workdir_that_cannot_be_shared_fails_the_job_without_a_slot(
    tmp_path, golden, keep_driver, job_dir, make, uid, kernel, message  # noqa: F811
):
    with open(os.path.join(job_dir, "file.txt"), "w"):
        pass
    extra = {"kernel": kernel} if kernel else {}
    config = make_config(tmp_path, (golden[0], golden[1], extra))
    result = prepare(config, workdir_job(make(job_dir), uid=uid), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and message in result.message, result.message
    assert "\n" not in result.message
    assert_nothing_left(config, keep_driver)


def test_a_xen_guest_refuses_the_share_and_cleans_up(tmp_path, golden, keep_driver, job_dir):  # noqa: F811
    config = make_config(tmp_path, (golden[0], golden[1], {"flavour": "xen-pv", "kernel": "/boot/vmlinuz"}))
    result = prepare(config, workdir_job(job_dir), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "cannot share a host directory" in result.message
    assert_nothing_left(config, keep_driver)


# -- real guests --------------------------------------------------------------------------------

JOB_SCRIPT = """\
set -e
pwd
tr a-z A-Z < input.txt > output.txt
mkdir -p results
wc -l < {absolute}/input.txt > {absolute}/results/lines.txt
id -u > results/uid.txt
"""
INPUT = "first line\nsecond line: ü\n"
OUTPUT = "FIRST LINE\nSECOND LINE: ü\n"  # tr works on bytes: the ü passes through unchanged


@contextlib.contextmanager
def nobodys_directory(name):
    """A fresh directory owned by nobody, under a 0755 parent QEMU's helpers can traverse."""
    parent = tempfile.mkdtemp(prefix="blahvm-jobfiles-", dir="/var/tmp")
    os.chmod(parent, 0o755)
    path = os.path.join(parent, name)
    os.mkdir(path)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def write_as_nobody(path, text):
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.chown(path, NOBODY, NOBODY)


def virtiofsd_serving(path):
    """Pids of virtiofsd processes whose command line names ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                argv = stream.read()
            if b"virtiofsd" in argv and path.encode() in argv:
                found.append(int(pid))
    return found


@pytest.mark.guest
def test_real_guest_job_reads_and_writes_its_own_directory(demo_image):
    with real_site(demo_image) as config, nobodys_directory("job dir – ü 'x' $HOME") as workdir:
        write_as_nobody(os.path.join(workdir, "input.txt"), INPUT)
        write_as_nobody(os.path.join(workdir, "job.sh"), JOB_SCRIPT.format(absolute=shlex.quote(workdir)))
        job = attrs.evolve(real_job(f"jf-{uuid.uuid4().hex[:6]}", demo_image), workdir=workdir)
        try:
            result = prepare(config, job, ready_timeout=READY_TIMEOUT)
            assert result.outcome is Outcome.OK, result.message
            print(f"prepare: {result.message}; timings {dict(result.timings)}")
            code, out, err = run_captured(config, job, ["sh", "job.sh"])
            assert (code, out) == (0, workdir.encode() + b"\n"), err
            assert virtiofsd_serving(workdir)
        finally:
            done = teardown(config, job.job_id)
        assert done.outcome is Outcome.OK, done.message
        assert_written_by_nobody(workdir, "output.txt", OUTPUT)
        assert_written_by_nobody(workdir, "results/lines.txt", "2\n")
        assert_written_by_nobody(workdir, "results/uid.txt", f"{NOBODY}\n")
        assert os.stat(os.path.join(workdir, "results")).st_uid == NOBODY
        assert virtiofsd_serving(workdir) == []


def assert_written_by_nobody(workdir, name, text):
    path = os.path.join(workdir, name)
    with open(path, encoding="utf-8") as stream:
        assert stream.read() == text
    status = os.stat(path)
    assert (status.st_uid, status.st_gid) == (NOBODY, NOBODY)


@pytest.mark.guest
def test_real_site_missing_workdir_fails_the_job_before_any_guest(demo_image):
    with real_site(demo_image) as config:
        job = attrs.evolve(real_job("jf-missing", demo_image), workdir="/var/tmp/blahvm-no-such-dir/job")
        result = prepare(config, job, ready_timeout=READY_TIMEOUT)
        assert result.outcome is Outcome.FAIL_JOB and "does not exist" in result.message
        assert "\n" not in result.message
