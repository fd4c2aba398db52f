"""A real volclava 2.2 (openlava-family LSF) for the tests, run by ``../shared/batch-systems/lava.sh``.

volclava is built and installed under /opt/volclava by ``scripts/setup-batch-systems``. Its daemons
run only inside the loopback-only network namespace ``rblava`` (they bind every address); ``lava.sh
up`` starts them there and ``lava.sh down`` stops them by PID, never by name. Every client command
here runs in that namespace too, with a clean environment and a time limit. Jobs are submitted as
``rbuser``, the drivers' normal user.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Dict, List, Optional

from tests.real_batch import SUBMIT_USER, NamespacedSystem, unavailable

PREFIX = "/opt/volclava"
ENVDIR = f"{PREFIX}/etc"
SERVERDIR = f"{PREFIX}/sbin"
BINDIR = f"{PREFIX}/bin"
NAMESPACE = "rblava"
PATH = f"{SERVERDIR}:{BINDIR}:/usr/sbin:/usr/bin:/sbin:/bin"
FINISHED = ("DONE", "EXIT")


def available() -> Optional[str]:
    return unavailable("lava.sh", f"{SERVERDIR}/sbatchd", "volclava")


def _acct_fields(record: str) -> List[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2)
            for m in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', record)]


class Lava(NamespacedSystem):
    """``with Lava() as lava: lava.bsub([...])``: volclava up in its namespace for the block."""

    script = "lava.sh"
    namespace = NAMESPACE
    driver_env = {"LAVA_PREFIX": PREFIX}
    client_env = {"PATH": PATH, "LSF_ENVDIR": ENVDIR}

    def __init__(self) -> None:
        self.acct = f"{PREFIX}/work/logdir/lsb.acct"
        if not os.path.isdir(os.path.dirname(self.acct)):
            self.acct = f"{PREFIX}/work/volclava/logdir/lsb.acct"

    def bsub(self, args: List[str], user: str = SUBMIT_USER, cwd: str = "/", input: Optional[str] = None,
             env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return self.run([f"{BINDIR}/bsub", *args], user=user, cwd=cwd, input=input, env=env)

    @staticmethod
    def job_id(submitted: subprocess.CompletedProcess) -> str:
        match = re.search(r"Job <([0-9]+)> is submitted", submitted.stdout)
        assert match, (submitted.returncode, submitted.stdout, submitted.stderr)
        return match.group(1)

    def job(self, job_id: str) -> Dict[str, str]:
        """``bjobs -a -json`` fields of the job (empty when LSF no longer knows it)."""
        done = self.run([f"{BINDIR}/bjobs", "-a", "-json", "-o", "jobid stat queue exec_host proj_name", job_id])
        try:
            record = json.loads(done.stdout)["RECORDS"][0]
        except (ValueError, KeyError, IndexError):
            return {}
        return {} if "ERROR" in record else record

    def wait(self, job_id: str, timeout: float = 300) -> Dict[str, str]:
        """The job's fields once it is DONE or EXIT and its accounting record is written."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("STAT") in FINISHED and self.accounting(job_id) is not None:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('STAT')} after {timeout}s: {fields}\n"
                                   f"{self.run([f'{BINDIR}/bjobs', '-l', job_id]).stdout}")
            time.sleep(0.5)

    def accounting(self, job_id: str) -> Optional[List[str]]:
        """The job's JOB_FINISH record in lsb.acct, split into fields."""
        try:
            with open(self.acct, errors="replace") as stream:
                lines = [line for line in stream if line.startswith('"JOB_FINISH"')]
        except OSError:
            return None
        for line in reversed(lines):
            fields = _acct_fields(line)
            if len(fields) > 3 and fields[3] == job_id:
                return fields
        return None

    def exit_status(self, job_id: str) -> int:
        """The job's exit code from its accounting record (bjobs leaves it out for jobs that used no CPU):
        128+N for a signal, as lava.sh decodes it."""
        fields = self.accounting(job_id)
        assert fields is not None, f"no accounting record for job {job_id}"
        status = int(fields[-8])
        return (status >> 8) & 0xFF if status & 0x7F == 0 else 128 + (status & 0x7F)

    def load(self, resource: str) -> Optional[float]:
        """``lsload -l``'s value of ``resource`` on this host (None while it shows '-')."""
        lines = self.run([f"{BINDIR}/lsload", "-l"]).stdout.splitlines()
        if len(lines) < 2:
            return None
        header, values = lines[0].split(), lines[1].split()
        try:
            value = values[header.index(resource)]
        except (ValueError, IndexError):
            return None
        try:
            return float(value)
        except ValueError:
            return None
