"""The run-dir root (host.run_dir) is root's alone, and nothing under it is reached through a symlink.

Before (issue 12), a root a user could write let that user put a symlink where a job's run dir
goes and have root chown whatever it pointed to. These tests play that user (a forked child that
really is ``nobody``) on test:///default; no guest boots.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile

import attrs
import pytest

from blahvm.hypervisor import naming
from blahvm.lifecycle import _rundir, prepare, teardown
from blahvm.lifecycle._bringup import hand_over_socket, make_run_dir
from blahvm.lifecycle._common import job_names
from blahvm.model import Outcome
from tests.as_user import run_as
from tests.test_lifecycle import live_entries, make_config, make_job

pytest.importorskip("libvirt")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def where():
    """A root-owned 0755 directory ``nobody`` can reach (pytest's own are 0700), with a victim in it:
    a root-owned directory holding a file, which no job's user may ever get or lose."""
    directory = tempfile.mkdtemp(prefix="blahvm-rundir-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    victim = os.path.join(directory, "victim")
    os.mkdir(victim, 0o755)
    with open(os.path.join(victim, "precious"), "w") as precious:
        precious.write("root's\n")
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def site(tmp_path, golden, run_dir):
    config = make_config(tmp_path, golden)
    return attrs.evolve(config, host=attrs.evolve(config.host, run_dir=run_dir))


def victim_intact(where):
    victim = os.path.join(where, "victim")
    status = os.lstat(victim)
    with open(os.path.join(victim, "precious")) as precious:
        content = precious.read()
    return (stat.S_ISDIR(status.st_mode), status.st_uid, status.st_gid, content) == (True, 0, 0, "root's\n")


def nobodys_job(job_id="1234.server"):
    return make_job(job_id, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)


# -- a root others could write is refused ---------------------------------------------------------


def _owned_by_nobody(where):
    root = os.path.join(where, "run")
    os.mkdir(root, 0o755)
    os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)
    return root, f"directory {root} is owned by uid {NOBODY.pw_uid}, not root"


def _world_writable(where):
    root = os.path.join(where, "run")
    os.mkdir(root)
    os.chmod(root, 0o777)
    return root, f"directory {root} is writable by group or others (mode 777)"


def _sticky_like_tmp(where):
    root = os.path.join(where, "run")
    os.mkdir(root)
    os.chmod(root, 0o1777)
    return root, f"host.run_dir {root} is writable by group or others (mode 1777)"


def _in_a_directory_of_nobody(where):
    parent = os.path.join(where, "nobodys")
    os.mkdir(parent, 0o755)
    os.chown(parent, NOBODY.pw_uid, NOBODY.pw_gid)
    root = os.path.join(parent, "run")
    os.mkdir(root, 0o755)
    return root, f"directory {parent} is owned by uid {NOBODY.pw_uid}, not root"


def _a_symlink_of_nobody(where):
    os.mkdir(os.path.join(where, "real"), 0o755)
    root = os.path.join(where, "run")
    os.symlink("real", root)
    os.lchown(root, NOBODY.pw_uid, NOBODY.pw_gid)
    return root, f"symbolic link {root} is owned by uid {NOBODY.pw_uid}, not root"


@pytest.mark.parametrize(
    "unsafe", [_owned_by_nobody, _world_writable, _sticky_like_tmp, _in_a_directory_of_nobody, _a_symlink_of_nobody],
    ids=lambda unsafe: unsafe.__name__.strip("_"),
)
def test_a_run_dir_root_others_could_write_is_refused_in_one_line(tmp_path, golden, keep_driver, where, unsafe):
    root, problem = unsafe(where)
    config = site(tmp_path, golden, root)
    job = nobodys_job()
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.RETRY_ELSEWHERE, result.message  # this host's setup, not the job
    assert result.message.startswith(f"prepare {job.job_id}: host.run_dir {root}") and problem in result.message
    assert "\n" not in result.message and "root's alone" in result.message
    assert live_entries(config) == ()  # refused before anything was reserved or made
    gone = teardown(config, job.job_id)  # nothing was made, so teardown touches nothing under it either
    assert gone.outcome is Outcome.OK and not gone.guest_removed and "no guest was ever made" in gone.message


def test_nobodys_symlink_in_a_root_nobody_owns_is_never_followed(tmp_path, golden, keep_driver, where):
    """The attack itself: nobody owns the root and plants the job's run dir as a link to the victim."""
    root, _ = _owned_by_nobody(where)
    config = site(tmp_path, golden, root)
    job = nobodys_job()
    planted = job_names(config, job.job_id).run_dir
    victim = os.path.join(where, "victim")
    assert run_as("nobody", lambda: os.symlink(victim, planted) or "planted") == "planted"
    assert prepare(config, job, ready_timeout=None).outcome is Outcome.RETRY_ELSEWHERE
    assert teardown(config, job.job_id).outcome is Outcome.OK  # nothing was made: nothing to remove
    assert victim_intact(where)
    assert os.readlink(planted) == victim  # not even touched


# -- in a root's own root, a planted symlink is removed, never followed ---------------------------


def test_a_symlink_where_the_run_dir_goes_is_replaced_not_followed(tmp_path, golden, keep_driver, where):
    config = site(tmp_path, golden, os.path.join(where, "run"))
    job = nobodys_job()
    run_dir = job_names(config, job.job_id).run_dir
    os.mkdir(config.host.run_dir, 0o755)
    os.symlink(os.path.join(where, "victim"), run_dir)  # as left by whoever could once write there
    result = prepare(config, job, ready_timeout=None)
    assert result.outcome is Outcome.OK, result.message
    status = os.lstat(run_dir)
    assert stat.S_ISDIR(status.st_mode) and (status.st_uid, status.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert victim_intact(where)
    os.rmdir(run_dir)
    os.symlink(os.path.join(where, "victim"), run_dir)
    assert teardown(config, job.job_id).outcome is Outcome.OK
    assert not os.path.lexists(run_dir) and victim_intact(where)


def test_a_run_dir_swapped_for_a_symlink_before_the_hand_over_gives_nothing_away(tmp_path, golden, where):
    """The window the attack raced: between making the run dir and giving it to the job's user."""
    config = site(tmp_path, golden, os.path.join(where, "run"))
    job = nobodys_job()
    names = job_names(config, job.job_id)
    make_run_dir(config.host.run_dir, names.run_dir)
    os.rmdir(names.run_dir)
    os.symlink(os.path.join(where, "victim"), names.run_dir)
    with pytest.raises(OSError):
        hand_over_socket(names, job, wait=False)
    assert victim_intact(where)


def test_a_missing_root_is_made_roots_and_0755_whatever_the_umask(where):
    root = os.path.join(where, "made", "run")
    previous = os.umask(0o077)  # as a PBS mom runs prologues
    try:
        _rundir.check_root(root)
    finally:
        os.umask(previous)
    status = os.stat(root)
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, 0o755)
    guest = naming.guest_name("x.1")
    _rundir.make(root, os.path.join(root, guest))
    assert stat.S_IMODE(os.stat(os.path.join(root, guest)).st_mode) == 0o700
    _rundir.remove(root, os.path.join(root, guest))
    assert os.listdir(root) == []
