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
import stat
import subprocess
import sys
import tempfile
import uuid

import importlib

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm import jobshare
from blahvm.guest import client
from blahvm.image import guest_init
from blahvm.jobshare import jail
from blahvm.lifecycle import prepare, reap, teardown
from blahvm.model import Job, Outcome
from tests.test_lifecycle import (
    assert_nothing_left,
    make_config,
    make_job,
    real_job,
    real_site,
    run_captured,
    shares_left,
)

pytest.importorskip("libvirt")

NOBODY = 65534
prepare_module = importlib.import_module("blahvm.lifecycle.prepare")
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


def test_prepare_shares_the_pinned_workdir_and_tells_the_guest_where(tmp_path, golden, keep_driver, job_dir):  # noqa: F811
    config = make_config(tmp_path, (golden[0], golden[1], {"kernel": "/boot/vmlinuz", "cmdline": "quiet"}))
    try:
        result = prepare(config, workdir_job(job_dir + "/"), ready_timeout=None)
        assert result.outcome is Outcome.OK, result.message
        xml = keep_driver.raw.lookupByName(result.guest).XMLDesc()
        root = jobshare.share_root(config.host.run_dir)
        point = jobshare.mount_point(root, result.guest)
        assert f"<source dir='{point}'/>" in xml and "<target dir='blahvm-workdir'/>" in xml
        assert f"<binary path='{os.path.join(root, jail.WRAPPER)}'/>" in xml
        assert "<source type='memfd'/>" in xml and "<access mode='shared'/>" in xml
        assert f"<cmdline>quiet {guest_init.workdir_argument(job_dir)}</cmdline>" in xml
        assert jobshare.shared_mounts(root) == [point]
        assert (os.stat(point).st_ino, os.stat(point).st_dev) == (os.stat(job_dir).st_ino, os.stat(job_dir).st_dev)
    finally:
        done = teardown(config, "77.server")
    assert done.outcome is Outcome.OK, done.message
    assert_nothing_left(config, keep_driver)
    assert shares_left(config) == []


def swap_parent_for_link(workdir, target_parent):
    """What a job's user can do to a parent of any directory in their home: rename it, link in its place."""
    parent = os.path.dirname(workdir)
    os.rename(parent, parent + ".moved")
    os.symlink(target_parent, parent)


@pytest.fixture
def raced_dirs(tmp_path):
    """home (the user's) / parent / job (the user's), and secret / job (root's alone) to swap in."""
    os.chmod(tmp_path, 0o755)
    job = tmp_path / "home" / "parent" / "job"
    job.mkdir(parents=True)
    for path in (tmp_path / "home", job.parent, job):
        os.chown(path, NOBODY, NOBODY)
    (job / "marker.txt").write_text("the user's\n")
    secret = tmp_path / "secret" / "job"
    secret.mkdir(parents=True, mode=0o700)
    (secret / "secret.txt").write_text("root's\n")
    return str(job), str(secret)


def test_a_parent_swapped_after_the_check_is_refused_at_the_pin(tmp_path, golden, keep_driver, raced_dirs,
                                                                monkeypatch):  # noqa: F811
    job_dir, secret = raced_dirs
    config = make_config(tmp_path, (golden[0], golden[1], {"kernel": "/boot/vmlinuz"}))
    real = prepare_module.make_run_dir

    def swap_then_make_run_dir(*args):  # between the path check (before the slot) and the pin
        swap_parent_for_link(job_dir, os.path.dirname(secret))
        return real(*args)

    monkeypatch.setattr(prepare_module, "make_run_dir", swap_then_make_run_dir)
    result = prepare(config, workdir_job(job_dir), ready_timeout=None)
    assert result.outcome is Outcome.FAIL_JOB and "is owned by uid 0" in result.message, result.message
    assert_nothing_left(config, keep_driver)
    assert shares_left(config) == []


def test_a_parent_swapped_before_the_start_leaves_the_checked_directory_shared(
    tmp_path, golden, keep_driver, raced_dirs, monkeypatch  # noqa: F811
):
    job_dir, secret = raced_dirs
    original = os.stat(job_dir)
    config = make_config(tmp_path, (golden[0], golden[1], {"kernel": "/boot/vmlinuz"}))
    real = prepare_module.guests.define_and_start
    monkeypatch.setattr(prepare_module.guests, "define_and_start",
                        lambda conn, xml: (swap_parent_for_link(job_dir, os.path.dirname(secret)), real(conn, xml))[1])
    try:
        result = prepare(config, workdir_job(job_dir), ready_timeout=None)
        assert result.outcome is Outcome.OK, result.message
        point = jobshare.mount_point(jobshare.share_root(config.host.run_dir), result.guest)
        assert (os.stat(point).st_dev, os.stat(point).st_ino) == (original.st_dev, original.st_ino)
        assert os.listdir(point) == ["marker.txt"]
    finally:
        teardown(config, "77.server")
    assert_nothing_left(config, keep_driver)
    assert shares_left(config) == []


def test_reap_unmounts_a_share_a_crash_left(tmp_path, golden, keep_driver, job_dir):  # noqa: F811
    config = make_config(tmp_path, golden)
    root = jobshare.share_root(config.host.run_dir)
    os.makedirs(config.host.run_dir, exist_ok=True)
    jobshare.pin(root, "blahvm-crashed-0123abcd", job_dir, NOBODY, (NOBODY,))  # prepare died after the pin
    assert len(shares_left(config)) == 2  # the mount and its entry
    report = reap(config)
    assert report.outcome is Outcome.OK and "unmounted 1 job directories" in report.message, report.message
    assert shares_left(config) == []
    assert os.path.isdir(job_dir)  # unmounted, never removed


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
            assert jail.served(jobshare.share_root(config.host.run_dir), result.guest)
        finally:
            done = teardown(config, job.job_id)
        assert done.outcome is Outcome.OK, done.message
        assert_written_by_nobody(workdir, "output.txt", OUTPUT)
        assert_written_by_nobody(workdir, "results/lines.txt", "2\n")
        assert_written_by_nobody(workdir, "results/uid.txt", f"{NOBODY}\n")
        assert os.stat(os.path.join(workdir, "results")).st_uid == NOBODY
        assert virtiofsd_serving(jobshare.share_root(config.host.run_dir)) == []
        assert shares_left(config) == []


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


# What guest root tries through the share (the payload runs as uid 0 in an allow_root environment).
ATTACKS = """\
attempt() { name=$1; shift; if "$@" 2>/dev/null; then echo "$name: done"; else echo "$name: refused"; fi; }
attempt create-as-root sh -c 'echo x > root-made'
attempt copy-a-shell cp /bin/busybox shell
attempt chown-to-root chown 0:0 victim.txt
attempt chmod-setuid chmod 4755 victim.txt
attempt chmod-setgid chmod 2755 victim.txt
attempt mknod mknod node c 1 3
attempt mkdir-setgid mkdir -m 2755 sgid-dir
attempt mkdir-then-setgid sh -c 'mkdir plain-dir && chmod g+s plain-dir'
attempt chown-roots-file chown 65534:65534 rootfile
"""
# What the job's own user does in a working job, then tries the set-id bits too.
HONEST = """\
set -e
echo data > new.txt
chmod +x new.txt
test -x new.txt
mv new.txt renamed.txt
mkdir -p sub/deeper
echo y > sub/deeper/f
rm -r sub
cat renamed.txt
if chmod u+s renamed.txt 2>/dev/null; then echo "setuid: done"; else echo "setuid: refused"; fi
stat -c %i .
ls
"""


def run_in_guest(socket_path, argv, cwd, uid=None, gid=None):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = client.run_payload(socket_path, argv, cwd=cwd, uid=uid, gid=gid, stdout=out.fileno(),
                                  stderr=err.fileno(), ready_timeout=READY_TIMEOUT)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(), err.read().decode()


@pytest.mark.guest
def test_real_guest_sees_the_checked_directory_and_its_root_cannot_escape_through_the_share(demo_image, monkeypatch):
    """One boot: a parent swapped for a link to a root-only directory between the check and the
    start (the race), then guest root's attacks, then the honest job; the host afterwards."""
    base = tempfile.mkdtemp(prefix="blahvm-jobfiles-", dir="/var/tmp")
    os.chmod(base, 0o755)
    home, secret_parent = os.path.join(base, "home"), os.path.join(base, "secret")
    workdir, secret = os.path.join(home, "parent", "job"), os.path.join(secret_parent, "job")
    os.makedirs(workdir)
    for path in (home, os.path.dirname(workdir), workdir):
        os.chown(path, NOBODY, NOBODY)
    os.makedirs(secret, 0o700)
    with open(os.path.join(secret, "secret.txt"), "w") as stream:
        stream.write("root's\n")
    write_as_nobody(os.path.join(workdir, "marker.txt"), "the user's\n")
    write_as_nobody(os.path.join(workdir, "victim.txt"), "#!/bin/sh\n")
    with open(os.path.join(workdir, "rootfile"), "w") as stream:  # a root-owned file already there
        stream.write("root's\n")
    original = os.stat(workdir)
    real = prepare_module.guests.define_and_start

    def swap_then_start(conn, xml):  # the window between prepare's check and virtiofsd's start
        swap_parent_for_link(workdir, secret_parent)
        return real(conn, xml)

    monkeypatch.setattr(prepare_module.guests, "define_and_start", swap_then_start)
    try:
        with real_site(demo_image) as config:
            env = attrs.evolve(config.environments["demo"], allow_root=True)
            config = attrs.evolve(config, environments={"demo": env})
            job = attrs.evolve(real_job(f"jr-{uuid.uuid4().hex[:6]}", demo_image), workdir=workdir)
            try:
                result = prepare(config, job, ready_timeout=READY_TIMEOUT)
                assert result.outcome is Outcome.OK, result.message
                assert os.path.islink(os.path.dirname(workdir))  # the swap happened
                served = jail.served(jobshare.share_root(config.host.run_dir), result.guest)
                assert served is not None and served[1]["uid_map"] == f"{NOBODY} {NOBODY} 1"
                code, out, err = run_in_guest(result.socket, ["sh", "-c", ATTACKS], workdir, uid=0, gid=0)
                print(out)
                assert code == 0, err
                assert len(out.splitlines()) == 9 and all(line.endswith(": refused") for line in out.splitlines()), out
                code, out, err = run_in_guest(result.socket, ["sh", "-c", HONEST], workdir)
                print(out)
                assert code == 0, err
                lines = out.splitlines()
                assert lines[:2] == ["data", "setuid: refused"] and lines[2] == str(original.st_ino), out
                assert "marker.txt" in lines and "secret.txt" not in lines
            finally:
                done = teardown(config, job.job_id)
            assert done.outcome is Outcome.OK, done.message
            assert shares_left(config) == []
            assert virtiofsd_serving(jobshare.share_root(config.host.run_dir)) == []
        host = os.path.dirname(workdir) + ".moved/job"  # where the user's directory is now
        assert_no_escape(host)
        assert os.listdir(secret) == ["secret.txt"]
        assert (os.stat(os.path.join(host, "victim.txt")).st_uid, os.stat(os.path.join(host, "rootfile")).st_uid) == (
            NOBODY, 0)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def assert_no_escape(top):
    """Nothing under ``top`` has set-id bits or is a device; everything is nobody's but rootfile."""
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            status = os.lstat(os.path.join(parent, name))
            assert not status.st_mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(status.st_mode))
            assert not stat.S_ISCHR(status.st_mode) and not stat.S_ISBLK(status.st_mode), name
            assert status.st_uid == (0 if name == "rootfile" else NOBODY), (name, status.st_uid)
