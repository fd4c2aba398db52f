"""``wait_ready`` and ``launch``: talk to the job's guest agent over its socket; no libvirt needed.

Both may run as the job's user: they only touch the job's own run dir.
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Optional, Sequence

from blahvm.guest import client
from blahvm.hypervisor.errors import SpecError
from blahvm.lifecycle._common import job_names_in_use
from blahvm.lifecycle.results import ReadyResult
from blahvm.model import Job, Outcome, SiteConfig

LAUNCH_FAILED = 255  # the payload never ran: the agent could not be reached (the reason went to stderr)


def wait_ready(config: SiteConfig, job: Job, timeout: float = 120.0) -> ReadyResult:
    """OK once the job's agent answers hello, RETRY_ELSEWHERE if it does not within ``timeout`` s."""
    started = time.monotonic()
    try:
        socket_path = job_names_in_use(config, job.job_id).socket
        client.wait_ready(socket_path, timeout)
    except (client.AgentError, SpecError) as error:
        return ReadyResult(Outcome.RETRY_ELSEWHERE, str(error), job.job_id, time.monotonic() - started)
    seconds = time.monotonic() - started
    return ReadyResult(Outcome.OK, f"job {job.job_id}: agent answered in {seconds:.2f}s", job.job_id, seconds)


def launch(
    config: SiteConfig,
    job: Job,
    argv: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    stdin: Optional[int] = None,
    stdout: int = 1,
    stderr: int = 2,
    ready_timeout: float = 120.0,
) -> int:
    """Run ``argv`` in the job's guest as the job's user (the identity ``prepare`` bound there,
    whatever ``job.uid`` says); its exit code (signal N: 128+N).

    ``cwd`` defaults to the job's working directory, which ``prepare`` mounted at the same path
    in the guest.

    If the payload cannot be started at all, a one-line reason goes to ``stderr`` and the result
    is ``LAUNCH_FAILED`` (255).
    """
    try:
        run_dir = job_names_in_use(config, job.job_id).run_dir
        with client.acquire_port(run_dir, timeout=ready_timeout) as socket_path:
            return client.run_payload(
                # no uid or gid: the guest runs its job as the identity root bound at prepare
                socket_path, argv, env=env, cwd=job.workdir if cwd is None else cwd,
                stdin=stdin, stdout=stdout, stderr=stderr, ready_timeout=ready_timeout,
            )
    except (client.AgentError, SpecError) as error:
        _say(stderr, f"blahvm: job {job.job_id} could not run in its guest: {error}\n")
        return LAUNCH_FAILED


def _say(fd: int, line: str) -> None:
    try:
        os.write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass
