"""The job's share on the host, without a guest: the seccomp filter, the pinning, the virtiofsd
jail (run with a probe in virtiofsd's place) and what reap finds after a crash.

Real guests (the race, guest root's attacks through the share) are in test_jobfiles.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from blahvm import jobshare
from blahvm.jobshare import jail, mounts, pinning, seccomp

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and user namespaces need root")


# -- the seccomp filter ------------------------------------------------------------------------------


def in_filtered_child(actions):
    """Run ``actions`` (name -> callable) in a forked child under the filter; name -> "ok" or errno name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        results = {}
        try:
            seccomp.install()
            for name, action in actions.items():
                try:
                    action()
                    results[name] = "ok"
                except OSError as error:
                    results[name] = errno.errorcode[error.errno]
        finally:
            os.write(write_end, json.dumps(results).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_seccomp_filter_refuses_setid_bits_and_nothing_else(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    results = in_filtered_child({
        "chmod u+s": lambda: os.chmod(path, 0o4755),
        "chmod g+s": lambda: os.chmod(path, 0o2755),
        "fchmod u+s": lambda: os.fchmod(fd, 0o4755),
        "chmod 0755": lambda: os.chmod(path, 0o755),
        "create 04755": lambda: os.close(os.open(tmp_path / "a", os.O_CREAT | os.O_WRONLY, 0o4755)),
        "create 0644": lambda: os.close(os.open(tmp_path / "b", os.O_CREAT | os.O_WRONLY, 0o644)),
        "open to read": lambda: os.close(os.open(path, os.O_RDONLY)),
        "mkdir 02755": lambda: os.mkdir(tmp_path / "c", 0o2755),
        "mkdir 0755": lambda: os.mkdir(tmp_path / "d", 0o755),
        "mknod fifo 04644": lambda: os.mknod(tmp_path / "e", stat.S_IFIFO | 0o4644),
        "mknod fifo 0644": lambda: os.mknod(tmp_path / "f", stat.S_IFIFO | 0o644),
    })
    os.close(fd)
    refused = {name for name, result in results.items() if result != "ok"}
    assert refused == {"chmod u+s", "chmod g+s", "fchmod u+s", "create 04755", "mkdir 02755", "mknod fifo 04644"}
    assert {results[name] for name in refused} == {"EPERM"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_seccomp_filter_is_built_for_each_known_arch():
    for arch in seccomp.ARCHES:
        program = seccomp.build_filter(arch)
        assert all(len(insn) == 8 for insn in program) and len(program) < 255  # one jump byte reaches anywhere


# -- pinning ---------------------------------------------------------------------------------------------


@pytest.fixture
def site():
    """A run dir and a job directory owned by nobody, under /var/tmp parents anyone may traverse."""
    base = tempfile.mkdtemp(prefix="blahvm-jobshare-", dir="/var/tmp")
    os.chmod(base, 0o755)
    home = os.path.join(base, "home")  # the job's user's: they can rename what is in it
    job = os.path.join(home, "parent", "job")
    os.makedirs(job)
    for path in (home, os.path.dirname(job), job):
        os.chown(path, NOBODY, NOBODY)
    secret = os.path.join(base, "secret", "job")  # root's alone
    os.makedirs(secret, 0o700)
    with open(os.path.join(secret, "secret.txt"), "w") as stream:
        stream.write("root only\n")
    run = os.path.join(base, "run")
    os.mkdir(run, 0o755)
    try:
        yield {"base": base, "job": job, "secret": secret, "run": run, "root": jobshare.share_root(run)}
    finally:
        for point in jobshare.shared_mounts(jobshare.share_root(run)):
            with contextlib.suppress(OSError):
                mounts.umount(point)
        shutil.rmtree(base, ignore_errors=True)


def swap_parent_for_link(site):
    """What the job's user can do to any directory under their home: rename a parent, link in its place."""
    parent = os.path.dirname(site["job"])
    os.rename(parent, parent + ".moved")
    os.symlink(os.path.dirname(site["secret"]), parent)


@needs_root
def test_pin_binds_the_checked_directory_nosuid_nodev_and_release_undoes_it(site):
    identity = jobshare.pin(site["root"], "blahvm-t-1", site["job"], NOBODY, (NOBODY,))
    point = jobshare.mount_point(site["root"], "blahvm-t-1")
    original = os.stat(site["job"])
    assert (identity.dev, identity.ino) == (original.st_dev, original.st_ino)
    assert jobshare.shared_mounts(site["root"]) == [point]
    options = mounts.mount_options(mounts.read_mountinfo(), point).split(",")
    assert "nosuid" in options and "nodev" in options
    for path, mode in ((site["root"], 0o700), (os.path.dirname(point), 0o700)):
        status = os.lstat(path)
        assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, mode)
    recorded = os.stat(os.path.join(site["root"], "blahvm-t-1", "identity"))
    assert (recorded.st_uid, stat.S_IMODE(recorded.st_mode)) == (0, 0o600)

    swap_parent_for_link(site)  # after the pin: changes nothing
    shown = os.stat(point)
    assert (shown.st_dev, shown.st_ino) == (original.st_dev, original.st_ino)
    assert "secret.txt" not in os.listdir(point)

    assert jobshare.release(site["root"], "blahvm-t-1")
    assert jobshare.shared_mounts(site["root"]) == [] and os.listdir(site["root"]) == []
    assert not jobshare.release(site["root"], "blahvm-t-1")  # gone is fine


@needs_root
def test_pin_refuses_a_parent_swapped_for_a_link_after_the_path_was_resolved(site, monkeypatch):
    resolved = os.path.realpath(site["job"])
    swap_parent_for_link(site)
    monkeypatch.setattr(pinning.os.path, "realpath", lambda path: resolved)  # resolved before the swap
    with pytest.raises(jobshare.ShareRefused, match="changed while it was checked"):
        jobshare.pin(site["root"], "blahvm-t-1", site["job"], NOBODY, (NOBODY,))
    assert jobshare.shared_mounts(site["root"]) == [] and jobshare.leftovers(site["root"], set()) == []


@needs_root
@pytest.mark.parametrize("uid, message", [(1000, "is owned by uid 65534, not by the job's uid 1000")])
def test_pin_refuses_a_foreign_directory_and_leaves_nothing(site, uid, message):
    with pytest.raises(jobshare.ShareRefused, match=message):
        jobshare.pin(site["root"], "blahvm-t-1", site["job"], uid, (uid,))
    assert jobshare.leftovers(site["root"], set()) == []


def test_mountinfo_mount_points_decode_escapes():
    text = "36 35 98:0 /a /mnt/with\\040space\\012nl rw,nosuid - ext3 /dev/root rw\n"
    assert mounts.mount_points(text) == ["/mnt/with space\nnl"]
    assert mounts.mount_options(text, "/mnt/with space\nnl") == "rw,nosuid"


# -- the jail, with a probe in virtiofsd's place -------------------------------------------------------

PROBE = """#!/usr/bin/python3 -I
import errno, json, os, sys
source = [o for o in sys.argv[3].split(",") if o.startswith("source=")][0][len("source="):]
facts = {"argv": sys.argv[1:], "uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups(),
         "env": dict(os.environ), "uid_map": open("/proc/self/uid_map").read().split(),
         "status": {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("Cap", "NoNew"))}}
def attempt(name, action):
    try:
        action()
        facts[name] = "ok"
    except OSError as error:
        facts[name] = errno.errorcode[error.errno]
made = os.path.join(source, "made")
attempt("create", lambda: open(made, "w").close())
attempt("chmod 4755", lambda: os.chmod(made, 0o4755))
attempt("chmod 0755", lambda: os.chmod(made, 0o755))
attempt("chown to root", lambda: os.chown(made, 0, 0))
attempt("become root", lambda: os.setresuid(-1, 0, -1))
attempt("read root's file", lambda: open(os.path.join(source, "rootfile")).read())
attempt("chown root's file", lambda: os.chown(os.path.join(source, "rootfile"), 65534, 65534))
print(json.dumps(facts))
"""


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="the probe runs on /usr/bin/python3")
def test_jail_runs_virtiofsd_as_the_job_alone_and_the_kernel_refuses_the_rest(site):
    with open(os.path.join(site["job"], "rootfile"), "w") as stream:
        stream.write("root's\n")
    os.chmod(os.path.join(site["job"], "rootfile"), 0o600)
    jobshare.pin(site["root"], "blahvm-t-1", site["job"], NOBODY, (NOBODY,))
    probe = os.path.join(site["base"], "probe")
    with open(probe, "w") as stream:
        stream.write(PROBE)
    os.chmod(probe, 0o755)
    wrapper = jail.install(site["root"], virtiofsd=probe)
    assert jail.install(site["root"], virtiofsd=probe) == wrapper  # unchanged: not rewritten
    status = os.stat(wrapper)
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, 0o700)
    source = jobshare.mount_point(site["root"], "blahvm-t-1")
    # what libvirt 9.0 passes, in an environment that must not matter (-I ignores it)
    done = subprocess.run([wrapper, "--fd=0", "-o", f"source={source},cache=auto", "--thread-pool-size=4"],
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": "/nonexistent", "PYTHONSTARTUP": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["argv"][:2] == ["--fd=0", "-o"] and facts["argv"][2].startswith(f"source={site['root']},")
    assert "sandbox=namespace" in facts["argv"][2] and facts["env"] == {"LC_ALL": "C"}
    assert facts["uids"] == [NOBODY] * 3 and facts["gids"] == [NOBODY] * 3 and facts["groups"] == [NOBODY]
    assert facts["uid_map"] == [str(NOBODY), str(NOBODY), "1"]
    assert facts["status"]["NoNewPrivs"] == "1" and facts["status"]["CapAmb"] == facts["status"]["CapPrm"]
    assert int(facts["status"]["CapAmb"], 16) == sum(1 << cap for cap in jail.CAPS.values())
    assert facts["create"] == facts["chmod 0755"] == "ok"
    assert facts["chmod 4755"] == "EPERM"  # the filter
    assert facts["chown to root"] == facts["become root"] == "EINVAL"  # root is not mapped
    assert facts["read root's file"] == "EACCES" and facts["chown root's file"] == "EPERM"
    made = os.stat(os.path.join(site["job"], "made"))
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (NOBODY, NOBODY, 0o755)
    assert os.stat(os.path.join(site["job"], "rootfile")).st_uid == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "source=/x/shares/blahvm-a/mnt"],  # no fd
        ["--fd=3", "-o", "source=/elsewhere/blahvm-a/mnt"],  # not under the share root
        ["--fd=3", "-o", "source=/x/shares/blahvm-a/../../etc/mnt"],
        ["--fd=3", "-o", "source=/x/shares/other/mnt"],  # not a guest's name
        ["--fd=3", "-o", "source=/x/shares/blahvm-a/mnt/sub"],
    ],
)
def test_jail_takes_only_a_share_under_its_root_from_libvirt(argv):
    with pytest.raises(jail.JailError):
        jail.parse_libvirt_argv(argv, "/x/shares")


def test_jail_reads_libvirt_options_with_doubled_commas():
    assert jail.split_options("source=/a,,b,cache=auto") == ["source=/a,b", "cache=auto"]
    assert jail.parse_libvirt_argv(["--fd=7", "-o", "source=/x/shares/blahvm-a/mnt,cache=auto"], "/x/shares") == (
        7, "blahvm-a")


def test_the_wrapper_fixes_its_interpreter_and_isolates_it():
    text = jail.wrapper_text("/run/blahvm/shares", "/usr/lib/qemu/virtiofsd", "/opt/venv/bin/python3")
    assert text.startswith("#!/opt/venv/bin/python3 -I\n")
    with pytest.raises(ValueError):
        jail.wrapper_text("/run/x'y", "/usr/lib/qemu/virtiofsd", "/opt/venv/bin/python3")
