"""The shape every prepare shares, whatever gives the guest: a clone made for the job, or a
site's static guest leased to it.

``run`` reuses what an earlier prepare of the same job left when it can stand, cleans it away when
not, then reserves, brings the guest up and waits for its agent; anything that fails midway is
taken apart again. Subclasses say how to reserve, how to bring up and how to take apart.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from blahvm.guest import client, control
from blahvm.hypervisor import guests, naming
from blahvm.hypervisor.connection import Connection
from blahvm.ledger import Entry, Ledger, State, owner_alive
from blahvm.lifecycle import _rundir
from blahvm.lifecycle._common import JobNames, Refusal, job_names, legacy_job_names
from blahvm.lifecycle.results import PrepareResult
from blahvm.model import Environment, Job, Outcome, SiteConfig

UP_STATES = ("running", "blocked")
SOCKET_APPEAR_TIMEOUT = 10.0


class BringUp:
    WHAT = "guest"  # how messages name what this prepare gives the job

    def __init__(self, config: SiteConfig, job: Job, environment: Environment, ledger: Ledger, conn: Connection,
                 ready_timeout: Optional[float]) -> None:
        self.config = config
        self.job = job
        self.environment = environment
        self.ledger = ledger
        self.conn = conn
        self.ready_timeout = ready_timeout
        self.names: JobNames = job_names(config, job.job_id)
        self.how: Optional[str] = None  # how the guest was started and why, for the result's line

    # -- what a subclass provides ---------------------------------------------------------------

    def _reserve(self) -> Entry:
        raise NotImplementedError

    def _bring_up(self, entry: Entry) -> PrepareResult:
        """Make or lease the guest and start it; ends with ``_started()``."""
        raise NotImplementedError

    def _take_apart(self, entry: Entry) -> Optional[str]:
        """Undo what ``entry`` records; the problem if that failed (the entry then stays for reap)."""
        raise NotImplementedError

    # -- the shared course ------------------------------------------------------------------------

    def run(self) -> PrepareResult:
        _rundir.check_root(self.config.host.run_dir)  # before anything is made: refused, nothing to undo
        existing = self.ledger.get(self.job.job_id)
        if existing is not None and existing.live:
            legacy = legacy_job_names(self.config, self.job.job_id)
            if existing.run_dir == legacy.run_dir:  # prepared before names carried the installation
                self.names = legacy
            resumed = self._resume(existing)
            if resumed is not None:
                return resumed
            self.names = job_names(self.config, self.job.job_id)  # the earlier guest is gone: made anew
        entry = self._reserve()
        try:
            return self._bring_up(entry)
        except BaseException as error:
            self._undo(error)
            raise

    def _resume(self, entry: Entry) -> Optional[PrepareResult]:
        """A result if an earlier prepare's entry can stand; None once a broken one is cleaned away."""
        if entry.state is State.TEARING_DOWN:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {self.job.job_id} is being torn down on this host")
        up = entry.guest is not None and guests.domain_state(self.conn, entry.guest) in UP_STATES
        if up and entry.state is State.RUNNING:
            if self.ready_timeout is not None:  # a guest started without waiting is bound now
                self._bind()
            return self._result(entry, f"reused the running {self.WHAT}", reused=True)
        if up and entry.state is State.BOOTING:
            if self.ready_timeout is None:
                return self._result(entry, f"reused the booting {self.WHAT}", reused=True)
            return self._await_agent(reused=True)
        if entry.state is not State.RUNNING and owner_alive(entry) and entry.pid != os.getpid():
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {self.job.job_id} is being prepared by process {entry.pid}")
        claimed = self.ledger.transition(
            entry.job_id, entry.state, State.TEARING_DOWN, expected_version=entry.version, pid=os.getpid()
        )
        if claimed is None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"job {entry.job_id} changed while prepare looked at it")
        problem = self._take_apart(claimed)
        if problem is not None:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"cannot clean the earlier {self.WHAT} of {entry.job_id}: {problem}")
        self.ledger.close(entry.job_id, Outcome.RETRY_ELSEWHERE, "half made; redone", expected_version=claimed.version)
        return None

    def _started(self, started_at: float) -> PrepareResult:
        """The guest is started: record the boot, then hand it over or wait for its agent."""
        self.ledger.record_timing(self.job.job_id, "boot", time.monotonic() - started_at)
        if self.ready_timeout is None:
            # handed over: whoever asked not to wait owns readiness; a "booting" entry is always a prepare at work
            self.ledger.transition(self.job.job_id, State.BOOTING, State.RUNNING)
            return self._result(self.ledger.get(self.job.job_id), f"{self.WHAT} started")
        return self._await_agent(reused=False)

    def _await_agent(self, reused: bool) -> PrepareResult:
        started = time.monotonic()
        self._bind()
        self.ledger.record_timing(self.job.job_id, "ready", time.monotonic() - started)
        self.ledger.transition(self.job.job_id, State.BOOTING, State.RUNNING)
        return self._result(self.ledger.get(self.job.job_id), f"{self.WHAT} ready", reused=reused)

    def _bind(self) -> None:
        """Wait for the agent on the control port and tell it whose job the guest runs: from then
        on it runs payloads as that identity alone (root's decision, never the socket holder's)."""
        identity = job_identity(self.job, self.environment, self.names.guest)
        try:
            control.bind(self.names.control_socket, identity, self.ready_timeout)
        except client.AgentError as error:
            raise Refusal(Outcome.RETRY_ELSEWHERE, f"{self.WHAT} of job {self.job.job_id} did not become ready: "
                          f"{error}") from None

    def _undo(self, error: BaseException) -> None:
        """Take apart whatever this prepare made and free the slot; the trail is in the ledger."""
        entry = self.ledger.get(self.job.job_id)
        if entry is None or not entry.live or entry.pid != os.getpid():
            return
        entry = self.ledger.transition(entry.job_id, entry.state, State.TEARING_DOWN, expected_version=entry.version)
        if entry is None:
            return
        if self._take_apart(entry) is None:  # else the entry stays live for teardown or reap to finish
            outcome = getattr(error, "outcome", Outcome.RETRY_ELSEWHERE)
            self.ledger.close(entry.job_id, outcome, str(error) or type(error).__name__, expected_version=entry.version)

    def _result(self, entry: Entry, message: str, reused: bool = False) -> PrepareResult:
        how = "" if reused or self.how is None else f"; {self.how}"
        return PrepareResult(
            Outcome.OK,
            f"job {self.job.job_id}: {message} ({entry.guest}){how}",
            self.job.job_id,
            guest=entry.guest,
            run_dir=entry.run_dir,
            socket=self.names.socket,
            reused=reused,
            timings=entry.timings,
        )


def job_identity(job: Job, environment: Environment, guest: str) -> control.Identity:
    """Who the job's payload runs as in its guest, as root decides it: the uid and gid the batch
    system vouched for, the user's groups on this host, root only where the environment allows it,
    and a hostname from ``guest``, the name blahvm gives the job's guest (``job_names``)."""
    if job.uid is None or job.gid is None:
        raise Refusal(Outcome.FAIL_JOB, f"job {job.job_id} has no uid and gid: its guest cannot be told "
                      "whom to run the job as")
    return control.Identity.of_user(job.user, job.uid, job.gid, root=environment.allow_root,
                                    hostname=naming.guest_hostname(guest))


def hand_over_socket(names: JobNames, job: Job, wait: bool, ports: int = 1) -> None:
    """Give the ``ports`` agent sockets, then their directory, to the job's user, and keep the
    control socket root's alone (drivers without channels make none)."""
    sockets = names.sockets(ports)
    if wait:
        for path in (*sockets, names.control_socket):
            _wait_for_path(path, SOCKET_APPEAR_TIMEOUT)
    _rundir.keep_socket(os.path.dirname(names.run_dir), names.control_socket)
    uid = -1 if job.uid is None else job.uid
    gid = -1 if job.gid is None else job.gid
    _rundir.hand_over(names.run_dir, sockets, uid, gid)  # by descriptors: never through a symlink


def make_run_dir(root: str, run_dir: str) -> None:
    """The job's run dir, root's alone (0700) until the socket in it is handed over, in a root
    only root can write (``_rundir``)."""
    _rundir.make(root, run_dir)


def _wait_for_path(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
