"""One job end to end on this host: prepare, launch, teardown, with each step's time reported."""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import attrs

from blahvm.lifecycle.launch import launch
from blahvm.lifecycle.prepare import prepare
from blahvm.lifecycle.teardown import teardown
from blahvm.model import Job, Outcome, SiteConfig

Report = Callable[[str, float, str], None]  # step, seconds, detail


@attrs.frozen
class RunResult:
    """``exit_code`` is the payload's when it ran (``outcome`` OK), else None and ``message`` says why."""

    outcome: Outcome
    message: str
    exit_code: Optional[int] = None


def run_job(
    config: SiteConfig,
    job: Job,
    argv: Sequence[str],
    stdin: Optional[int] = None,
    stdout: int = 1,
    stderr: int = 2,
    report: Report = lambda step, seconds, detail: None,
) -> RunResult:
    """Run ``argv`` in a fresh guest for ``job``; the guest is gone afterwards whatever happened."""
    try:
        prepared = prepare(config, job)
        for phase, seconds in prepared.timings:
            report(phase, seconds, "")
        if prepared.outcome is not Outcome.OK:
            return RunResult(prepared.outcome, prepared.message)
        start = time.perf_counter()
        code = launch(config, job, argv, stdin=stdin, stdout=stdout, stderr=stderr)
        report("run", time.perf_counter() - start, f"exit {code}")
        return RunResult(Outcome.OK, f"job {job.job_id} exited {code}", code)
    finally:
        done = teardown(config, job.job_id)
        report("teardown", done.seconds, "" if done.outcome is Outcome.OK else done.message)
