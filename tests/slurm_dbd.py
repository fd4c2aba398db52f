"""Slurm's accounting database for a test cluster: its own MariaDB and slurmdbd, so ``sacct`` answers.

``dbd = SlurmDbd(); SlurmCluster(extra + dbd.lines(munge_socket)...)`` would need the munge socket
first; instead pass ``before_controller=dbd.start`` and ``extra=dbd.lines_for(cluster_dir)``. Both
daemons live in the cluster's directory (MariaDB on a loopback port of its own, its data under
``db/``), and are stopped by their pid files with the cluster. Starting both takes about a second.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from typing import List, Optional

from tests.slurm_cluster import _free_port

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
SLURMDBD = "/usr/sbin/slurmdbd"


def available() -> Optional[str]:
    for program in (MARIADBD, INSTALL_DB, SLURMDBD):
        if not os.path.exists(program):
            return f"{program} is not installed (scripts/install-system-packages installs slurmdbd and mariadb-server)"
    return None


class SlurmDbd:
    def __init__(self) -> None:
        self.port = _free_port()  # slurmdbd's
        self.db_port = _free_port()

    def lines(self, munge_socket: str) -> List[str]:
        """slurm.conf's accounting lines. AccountingStoragePass names the munge socket for slurmdbd's connections."""
        return ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
                f"AccountingStoragePort={self.port}", f"AccountingStoragePass={munge_socket}"]

    def start(self, cluster) -> None:
        """Start MariaDB and slurmdbd for ``cluster`` (its munged already runs) and register the cluster."""
        db = os.path.join(cluster.dir, "db")
        os.makedirs(db, exist_ok=True)
        mysql = pwd.getpwnam("mysql")
        os.chown(db, mysql.pw_uid, mysql.pw_gid)
        self._run([INSTALL_DB, "--no-defaults", f"--datadir={db}/data", "--user=mysql",
                   "--auth-root-authentication-method=normal", "--skip-test-db"])
        cluster.pidfiles["mariadbd"] = f"{db}/mariadbd.pid"
        subprocess.Popen(["runuser", "-u", "mysql", "--", MARIADBD, "--no-defaults", f"--datadir={db}/data",
                          f"--socket={db}/mysql.sock", f"--port={self.db_port}", "--bind-address=127.0.0.1",
                          f"--pid-file={db}/mariadbd.pid", f"--log-error={db}/mariadbd.log"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        self._wait(lambda: os.path.exists(f"{db}/mysql.sock") and os.path.exists(f"{db}/mariadbd.pid"), "mariadbd",
                   f"{db}/mariadbd.log")
        conf = os.path.join(cluster.dir, "slurmdbd.conf")  # slurmdbd reads it beside SLURM_CONF
        with open(conf, "w") as stream:
            stream.write("\n".join([
                "AuthType=auth/munge", f"AuthInfo=socket={cluster.munge_socket}", "DbdHost=localhost",
                f"DbdPort={self.port}", "SlurmUser=root", "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1", f"StoragePort={self.db_port}", "StorageUser=root", "StorageLoc=slurm_acct_db",
                f"PidFile={cluster.dir}/slurmdbd.pid", f"LogFile={cluster.dir}/slurmdbd.log", "DebugLevel=info"]) + "\n")
        os.chmod(conf, 0o600)
        cluster.pidfiles["slurmdbd"] = f"{cluster.dir}/slurmdbd.pid"
        self._run([SLURMDBD], env=cluster.env)
        asked = []
        self._wait(lambda: asked.append(cluster.run(["sacctmgr", "-n", "show", "cluster"])) or asked[-1].returncode == 0,
                   "slurmdbd", f"{cluster.dir}/slurmdbd.log", lambda: asked[-1].stderr if asked else "")
        added = cluster.run(["sacctmgr", "-i", "add", "cluster", "blahvmtest"])
        assert added.returncode == 0, added.stderr

    @staticmethod
    def _run(argv, env=None) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip()[-2000:]}")

    @staticmethod
    def _wait(condition, what: str, log: str, said=lambda: "", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                try:
                    with open(log, errors="replace") as stream:
                        tail = stream.read()[-2000:]
                except OSError:
                    tail = ""
                raise RuntimeError(f"timed out waiting for {what}: {said()} {tail}")
            time.sleep(0.2)
