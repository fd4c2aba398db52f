"""A real OpenPBS 23.06 for the tests, run by ``../shared/batch-systems/pbs.sh``.

OpenPBS is built and installed under /opt/pbs (PBS_HOME /var/spool/pbs) by
``scripts/setup-batch-systems``. Its daemons run only inside the loopback-only network namespace
``rbpbs``; ``pbs.sh up`` starts them there and ``pbs.sh down`` stops them by PID. Every client
command here runs in that namespace too, with a clean environment and a time limit. Jobs are
submitted as ``JOB_USER`` (``job_user()`` makes it): a user whose home is root's, so that OpenPBS's job
directory (``PBS_JOBDIR``, the home) is not theirs and execjob_begin shares nothing with the guest.
``ip netns exec`` gives the daemons a mount namespace of their own, where a share cannot be pinned for
libvirt's virtiofsd (the share itself is tested in tests/test_jobfiles.py).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from typing import Dict, List, Optional

from tests.real_batch import NamespacedSystem, unavailable

PREFIX = "/opt/pbs"
HOME = "/var/spool/pbs"
CONF = f"{PREFIX}/pbs.conf"
NAMESPACE = "rbpbs"
PATH = f"{PREFIX}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_USER = "blahvmjob"
JOB_USER_HOME = "/var/lib/blahvm-batch-home"  # root's, 0755: OpenPBS runs the job there, nothing is shared


def qstat_json(text: str) -> str:
    """``qstat -F json`` as JSON: OpenPBS 23.06 writes a job's backslashes unescaped (``\\(`` of a
    ``sed`` in ``Submit_arguments`` is an invalid escape)."""
    from blahvm.batch.pbs import qstat_json_text

    return qstat_json_text(text)


def job_user() -> pwd.struct_passwd:
    """The submitting user, made on first use and reused after (idempotent): login shell /bin/sh (the
    demo guest has no other), a home directory root owns. One that exists with a home of its own is
    refused rather than changed."""
    try:
        account = pwd.getpwnam(JOB_USER)
    except KeyError:
        os.makedirs(JOB_USER_HOME, mode=0o755, exist_ok=True)
        os.chown(JOB_USER_HOME, 0, 0)
        os.chmod(JOB_USER_HOME, 0o755)
        subprocess.run(["useradd", "--no-create-home", "--home-dir", JOB_USER_HOME, "--shell", "/bin/sh",
                        "--user-group", JOB_USER], check=True, capture_output=True, timeout=60)
        account = pwd.getpwnam(JOB_USER)
    status = os.stat(account.pw_dir)
    if status.st_uid != 0 or status.st_mode & 0o022 or account.pw_shell != "/bin/sh":
        raise RuntimeError(f"user {JOB_USER} exists with home {account.pw_dir} (uid {status.st_uid}, mode "
                           f"{status.st_mode & 0o7777:o}) and shell {account.pw_shell}: the tests need a root-owned "
                           "home that is not group/other-writable and /bin/sh")
    return account


def available() -> Optional[str]:
    return unavailable("pbs.sh", f"{PREFIX}/sbin/pbs_server", "OpenPBS")


class OpenPBS(NamespacedSystem):
    """``with OpenPBS() as pbs: pbs.qsub([...])``: OpenPBS up in its namespace for the block."""

    script = "pbs.sh"
    namespace = NAMESPACE
    driver_env = {"PBS_PREFIX": PREFIX}
    client_env = {"PATH": PATH, "PBS_CONF_FILE": CONF}

    def qmgr(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        done = self.run([f"{PREFIX}/bin/qmgr", "-c", command])
        if check and done.returncode != 0:
            raise RuntimeError(f"qmgr -c {command!r}: {done.stdout} {done.stderr}")
        return done

    def qsub(self, args: List[str], user: str = JOB_USER, cwd: str = "/",
             input: Optional[str] = None) -> subprocess.CompletedProcess:
        return self.run([f"{PREFIX}/bin/qsub", *args], user=user, cwd=cwd, input=input)

    def job(self, job_id: str) -> Dict:
        done = self.run([f"{PREFIX}/bin/qstat", "-xf", "-F", "json", job_id])
        try:
            return next(iter(json.loads(qstat_json(done.stdout))["Jobs"].values()))
        except (ValueError, KeyError, StopIteration):
            return {}

    def slots(self) -> Optional[int]:
        """``resources_available.blahvm_slots`` of this host's vnode, as the server has it."""
        done = self.run([f"{PREFIX}/bin/pbsnodes", "-a", "-F", "json"])
        try:
            nodes = json.loads(qstat_json(done.stdout))["nodes"]
            return next(iter(nodes.values()))["resources_available"].get("blahvm_slots")
        except (ValueError, KeyError, StopIteration, AttributeError):
            return None

    def wait(self, job_id: str, timeout: float = 300) -> Dict:
        """The job's attributes once it is finished (F) and the mom has purged it."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("job_state") == "F" and not any(
                    name.startswith(job_id) for name in os.listdir(f"{HOME}/mom_priv/jobs")):
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('job_state')} after {timeout}s: {fields}")
            time.sleep(0.5)

    def mom_log(self) -> str:
        try:
            with open(f"{HOME}/mom_logs/{time.strftime('%Y%m%d')}", errors="replace") as stream:
                return stream.read()[-5000:]
        except OSError:
            return ""
