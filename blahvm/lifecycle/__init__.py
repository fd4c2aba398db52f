"""The common batch interface on the execution host: prepare, wait_ready, launch, teardown, reap, capacity,
suspend and resume of a job's guest, and the accounting of what each guest used.

Every step but ``launch`` returns a frozen result carrying an ``Outcome`` and a one-line message,
and never raises for an expected failure; ``launch`` returns the payload's exit code. libvirt is
reached only through ``blahvm.hypervisor``; ``launch`` and ``wait_ready`` need none of it.

    result = prepare(config, job)              # prologue, as root
    code = launch(config, job, ["/bin/echo"])  # job starter, as the job's user
    teardown(config, job.job_id)               # epilogue, as root
"""

from blahvm.lifecycle.accounting import AccountingRecord, AccountingReport, accounting
from blahvm.lifecycle.capacity import capacity
from blahvm.lifecycle.follow import follow
from blahvm.lifecycle.launch import LAUNCH_FAILED, launch, wait_ready
from blahvm.lifecycle._common import DEFAULT_READY_TIMEOUT
from blahvm.lifecycle.prepare import FROM_ENVIRONMENT, prepare
from blahvm.lifecycle.reap import reap
from blahvm.lifecycle.run import RunResult, run_job
from blahvm.lifecycle.results import Capacity, PrepareResult, ReadyResult, ReapReport, TeardownResult
from blahvm.lifecycle.suspend import SuspendResult, resume, suspend
from blahvm.lifecycle.teardown import teardown

__all__ = [
    "AccountingRecord",
    "AccountingReport",
    "Capacity",
    "DEFAULT_READY_TIMEOUT",
    "FROM_ENVIRONMENT",
    "LAUNCH_FAILED",
    "PrepareResult",
    "ReadyResult",
    "ReapReport",
    "RunResult",
    "SuspendResult",
    "accounting",
    "TeardownResult",
    "capacity",
    "follow",
    "launch",
    "prepare",
    "reap",
    "resume",
    "run_job",
    "suspend",
    "teardown",
    "wait_ready",
]
