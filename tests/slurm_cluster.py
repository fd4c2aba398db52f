"""A real Slurm for the tests: its own munged, slurmctld and one or more slurmd on localhost.

Everything lives in a private directory (config, munge key and socket, state, spool, logs, pid
files), on ports nobody else uses, so it never touches a Slurm or munge the machine may run. The
daemons are stopped by the pids in their pid files, never by name.

Several nodes are several slurmd, each on its own port, in its own UTS namespace (its hostname is
its node name) and mount namespace, where ``binds[node] = (source, target)`` is bind-mounted: that is
how each "host" gets its own blahvm config at the path fixed in the hooks, as separate machines
would. They share this machine's libvirtd, which runs outside those namespaces: what a node mounts for
its guests (the pinned job directories under its share root, ``shared[node]``) must reach the
virtiofsd libvirtd starts, so each such directory is made a shared mount, a peer between this
machine's namespace and that node's, before the node starts (the rest of the node's mounts stay its own).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

SBIN = "/usr/sbin"
NODE = "node1"  # not "localhost": squeue -w takes that to mean this machine's hostname


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def available() -> Optional[str]:
    """None when Slurm and munge are installed, else why not."""
    for program in ("munged", "slurmctld", "slurmd"):
        if not os.path.exists(os.path.join(SBIN, program)):
            return f"{program} is not installed (scripts/install-system-packages installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "a Slurm cluster needs root"
    return None


class SlurmCluster:
    """``with SlurmCluster(extra_lines) as cluster: cluster.run(["sbatch", ...])``."""

    def __init__(self, extra: Optional[List[str]] = None, directory: Optional[str] = None,
                 cpus: int = 2, node_options: str = "", files: Optional[Dict[str, str]] = None,
                 nodes: Optional[List[str]] = None, binds: Optional[Dict[str, tuple]] = None,
                 node_extra: Optional[Dict[str, str]] = None, shared: Optional[Dict[str, List[str]]] = None,
                 before_controller=None) -> None:
        self.before_controller = before_controller  # called with the cluster once munged runs (slurmdbd)
        self.shared = {node: list(paths) for node, paths in (shared or {}).items()}
        self.peer_mounts: List[str] = []
        self.nodes = list(nodes or [NODE])
        self.binds = dict(binds or {})  # node -> (source, target) bind-mounted in that slurmd's namespace
        self.node_extra = dict(node_extra or {})  # node -> more words for its NodeName line (Weight=...)
        self.ports = {node: _free_port() for node in self.nodes}
        self.ctl_port = _free_port()  # fixed: reconfigure rewrites slurm.conf
        self.extra = list(extra or [])
        self.files = dict(files or {})  # name in the config directory -> file to copy there (job_submit.lua)
        self.cpus = cpus
        self.node_options = node_options  # e.g. "Features=vm Gres=blahvm:1": its environments and guest slots
        self.dir = directory or tempfile.mkdtemp(prefix="blahvm-slurm-", dir="/var/tmp")
        os.chmod(self.dir, 0o755)  # job users read the config through it
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self.pidfiles: Dict[str, str] = {}

    # -- the environment every Slurm command needs -----------------------------------------------

    @property
    def env(self) -> Dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "SLURM_CONF": self.conf,
                "HOME": "/", "LANG": "C.UTF-8"}

    def run(self, argv: List[str], user: Optional[str] = None, timeout: float = 120,
            **options) -> subprocess.CompletedProcess:
        if user is not None:
            argv = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.conf}", *argv]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, **options)

    def scontrol(self, *args: str) -> str:
        result = self.run(["scontrol", *args])
        if result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict (empty once the job is gone)."""
        result = self.run(["scontrol", "show", "job", "-o", job_id])
        if result.returncode != 0:
            return {}
        fields: Dict[str, str] = {}
        for word in result.stdout.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def node_state(self, node: str = NODE) -> str:
        lines = self.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"]).stdout.split()  # one line per partition
        return lines[0] if lines else ""

    def node(self, node: str = NODE) -> Dict[str, str]:
        out = self.scontrol("show", "node", "-o", node)
        fields = dict(word.partition("=")[::2] for word in out.split(" Reason=")[0].split() if "=" in word)
        if " Reason=" in out:
            fields["Reason"] = out.split(" Reason=", 1)[1].strip()
        return fields

    def wait_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                              "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"),
                 timeout: float = 180) -> Dict[str, str]:
        """The job's fields once it reaches one of ``states`` (or vanishes: then {})."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if not fields or fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout}s: {fields}")
            time.sleep(0.3)

    def log(self, daemon: str) -> str:
        if daemon == "slurmd":
            return "".join(self.log(f"slurmd.{node}") for node in self.nodes)
        try:
            with open(os.path.join(self.dir, f"{daemon}.log"), errors="replace") as stream:
                return stream.read()
        except OSError:
            return ""

    # -- start and stop ---------------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("state", "spool", "munge", *(os.path.join("spool", node) for node in self.nodes)):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        lines = [
            "ClusterName=blahvmtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={self.ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            # one line only (Slurm reads one): the blahvm install's parameters merged into ours
            "SchedulerParameters=" + ",".join(["defer"] + [line.split("=", 1)[1] for line in self.extra
                                                           if line.startswith("SchedulerParameters=")]),
            f"StateSaveLocation={self.dir}/state",
            f"SlurmdSpoolDir={self.dir}/spool/%n",
            f"SlurmctldPidFile={self.dir}/slurmctld.pid",
            f"SlurmdPidFile={self.dir}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.dir}/slurmctld.log",
            f"SlurmdLogFile={self.dir}/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MinJobAge=120",
            "KillWait=5",
            *[line for line in self.extra if not line.startswith("SchedulerParameters=")],
        ]
        for node in self.nodes:
            hostname = "localhost" if self.nodes == [NODE] else node
            lines.append(f"NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={self.ports[node]} "
                         f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN {self.node_options} "
                         f"{self.node_extra.get(node, '')}".rstrip())
        if not any(line.startswith("PartitionName=") for line in self.extra):
            lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as stream:
            stream.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)

    def start(self) -> "SlurmCluster":
        self.write_config()
        for name, source in self.files.items():
            shutil.copy(source, os.path.join(self.dir, name))
        munge_dir = os.path.join(self.dir, "munge")
        munge = pwd.getpwnam("munge")
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as stream:
            stream.write(os.urandom(128))
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(munge_dir, 0o755)  # job users' clients reach the socket through it
        os.chmod(key, 0o600)
        self.pidfiles["munged"] = os.path.join(munge_dir, "munged.pid")
        self._daemon(["runuser", "-u", "munge", "--", f"{SBIN}/munged", f"--socket={self.munge_socket}",
                      f"--key-file={key}", f"--pid-file={self.pidfiles['munged']}",
                      f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"])
        self._wait_for(lambda: os.path.exists(self.munge_socket), "munged's socket")
        if self.before_controller is not None:
            self.before_controller(self)
        self.pidfiles["slurmctld"] = os.path.join(self.dir, "slurmctld.pid")
        self._daemon([f"{SBIN}/slurmctld", "-c", "-f", self.conf])
        self._wait_for(lambda: self.run(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld")
        for node in self.nodes:
            self.pidfiles[f"slurmd {node}"] = os.path.join(self.dir, f"slurmd.{node}.pid")
            if self.nodes == [NODE] and not self.binds:
                self._daemon([f"{SBIN}/slurmd", "-N", node, "-f", self.conf])
                continue
            for path in self.shared.get(node, []):  # a peer group: its mounts propagate both ways
                os.makedirs(path, mode=0o700, exist_ok=True)
                for argv in (["mount", "--bind", path, path], ["mount", "--make-shared", path]):
                    subprocess.run(argv, check=True, capture_output=True, timeout=30)
                self.peer_mounts.append(path)
            # its own hostname and mounts, as a separate machine would have (slurmd daemonizes); this
            # machine's mounts are private, so only the peer mounts above are shared with it
            setup = f"hostname {node}"
            if node in self.binds:
                source, target = self.binds[node]
                setup += f" && mount --bind '{source}' '{target}'"
            self._daemon(["unshare", "--mount", "--uts", "--propagation", "unchanged", "--", "sh", "-c",
                          f"{setup} && exec {SBIN}/slurmd -N {node} -f {self.conf}"])
        for node in self.nodes:
            self._wait_for(lambda: self.node_state(node) == "idle", f"node {node} to come up idle")
        return self

    def slurmd_pid(self, node: str) -> int:
        with open(self.pidfiles[f"slurmd {node}"]) as stream:
            return int(stream.read().strip())

    def on_node(self, node: str, argv: List[str], env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``argv`` as that node's hooks run: in its slurmd's mount and UTS namespaces."""
        return subprocess.run(["nsenter", "-t", str(self.slurmd_pid(node)), "-m", "-u", "--", *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def _daemon(self, argv: List[str]) -> None:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed to start: {result.stderr.strip()}")

    def _wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; slurmctld log:\n{self.log('slurmctld')[-3000:]}"
                                   f"\nslurmd log:\n{self.log('slurmd')[-3000:]}")
            time.sleep(0.2)

    def reconfigure(self, extra: List[str]) -> None:
        self.extra = list(extra)
        self.write_config()
        self.scontrol("reconfigure")

    def stop(self) -> None:
        """Stop the daemons by their pid files (slurmd first), waiting until each is gone."""
        others = [name for name in self.pidfiles if name != "munged" and name != "slurmctld" and not name.startswith("slurmd ")]
        for name in (*(f"slurmd {node}" for node in self.nodes), "slurmctld", *others, "munged"):
            path = self.pidfiles.get(name)
            if not path:
                continue
            try:
                with open(path) as stream:
                    pid = int(stream.read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        self.stop()
        for path in reversed(self.peer_mounts):
            subprocess.run(["umount", path], capture_output=True, timeout=30)
        self.peer_mounts = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()
