"""Where the real batch systems the LSF and PBS tests run come from: ``../shared/batch-systems`` beside
the checkout (sources, build scripts, drivers), built by ``scripts/setup-batch-systems``.

Without ``../shared`` (a user's own checkout) those tests skip with a reason that starts with
``NO_SHARED``; that one skip stays a skip under ``BLAHVM_STRICT=1`` (tests/conftest.py). Any other
reason (not built, not root) is a failure of the set-up there. ``NamespacedSystem`` is what the
volclava and OpenPBS clusters (tests/lava_cluster.py, tests/openpbs_cluster.py) share.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BLAHVM_BATCH_SYSTEMS") or os.path.realpath(os.path.join(ROOT, "..", "shared",
                                                                                 "batch-systems"))
NO_SHARED = "no ../shared/batch-systems beside the checkout"
SUBMIT_USER = "rbuser"  # the drivers' submitting user; scripts/setup-batch-systems creates it


def unavailable(driver: str, built: str, what: str) -> Optional[str]:
    """None when ``driver`` (in SHARED) and the installed ``built`` file exist and we are root, else why not."""
    if not os.path.isfile(os.path.join(SHARED, driver)):
        return f"{NO_SHARED}: the real {what} tests need its sources and drivers"
    if os.geteuid() != 0:
        return f"a real {what} needs root"
    if not os.path.exists(built):
        return f"{what} is not built ({built} missing): run scripts/setup-batch-systems"
    return None


class NamespacedSystem:
    """A real batch system whose daemons run in a loopback-only network namespace, driven by
    ``SHARED/<script>`` (``up``, ``down``, ...); every client command runs in that namespace with a clean
    environment and a time limit. ``with System() as system:`` keeps it up for the block."""

    script = ""  # the driver in SHARED: "lava.sh", "pbs.sh"
    namespace = ""  # its network namespace: "rblava", "rbpbs"
    driver_env: Dict[str, str] = {}  # what the driver needs beyond PATH and HOME (its prefix)
    client_env: Dict[str, str] = {}  # PATH and where the clients find their configuration

    def driver(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """``SCRIPT ARGS``; raises with its output when it fails (unless not ``check``)."""
        done = subprocess.run([os.path.join(SHARED, self.script), *args], capture_output=True, text=True,
                              timeout=timeout, cwd="/",
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", **self.driver_env})
        if check and done.returncode != 0:
            raise RuntimeError(f"{self.script} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def run(self, argv: List[str], user: Optional[str] = None, cwd: str = "/", timeout: float = 60,
            input: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """A client command in the namespace, as ``user`` (default root), with a clean environment."""
        environ = {"LANG": "C.UTF-8", **self.client_env, **(env or {})}
        command = ["ip", "netns", "exec", self.namespace]
        if user is not None:
            account = pwd.getpwnam(user)
            environ.update(HOME=account.pw_dir, USER=user, LOGNAME=user, SHELL=account.pw_shell)
            command += ["runuser", "-u", user, "--"]
        command += ["env", "-i", *(f"{k}={v}" for k, v in environ.items()), *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def up(self) -> None:
        """Start the daemons; daemons a test run left behind (it was killed) are stopped first."""
        if self.driver("up", check=False).returncode != 0:
            self.driver("down", check=False)
            self.driver("up")

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.driver("down")


# -- the test site's libvirt leftovers ------------------------------------------------------------


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def guests_of_pool(pool: str) -> List[str]:
    """The blahvm guests whose disks are in the test site's ``pool``: that site's, whatever made them."""
    return [name for name in virsh("list", "--all", "--name").stdout.split()
            if name.startswith("blahvm-") and pool in virsh("dumpxml", name).stdout]


def settle_templates(config_path: str, timeout: float = 900) -> None:
    """Wait until no template maker of the test site works (a job that booted for want of a saved
    state started one in the background), then check the makers left nothing but templates: call it
    before any check that nothing is left. A made template is the site's state; a maker's guest,
    volume, run dir, scratch dir or mark after it ended is a leak."""
    from blahvm.config import load_config
    from blahvm.lifecycle import templates

    config = load_config(config_path)
    assert templates.wait_for_makers(config, timeout), f"a template maker of {config_path} still works"
    left = templates.leftovers(config, set())
    assert left == [], f"template makers of {config_path} left {left}"


def remove_pool_and_its_guests(pool: str) -> None:
    for name in guests_of_pool(pool):
        virsh("destroy", name)
        virsh("undefine", name)
    virsh("pool-destroy", pool)
    virsh("pool-undefine", pool)


def remove_run_dirs(run_dir: str) -> None:
    """A test site's run dir and the pinned shares beside it (``RUN_DIR-shares``). What a failed test left
    mounted there is unmounted first: nothing is ever removed through a job's bind mount."""
    shares = run_dir + "-shares"
    with open("/proc/self/mountinfo") as stream:
        mounted = [line.split()[4] for line in stream if line.split()[4].startswith((run_dir + "/", shares + "/"))]
    for point in sorted(mounted, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(shares, ignore_errors=True)
