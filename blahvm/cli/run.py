"""``blahvm run``: route, prepare, launch and tear down one job, for an admin trying an environment."""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.submission import BadSubmission, account_of, add_submission_options, submission_from_args
from blahvm.errors import printable

EXIT_REJECTED, EXIT_RETRY, EXIT_FAIL_JOB = 1, 75, 76


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "run", help="run one command in a fresh guest, as a batch job would",
        description="Route a submission, clone and boot its guest, run COMMAND inside it as USER, and tear the "
                    "guest down, with each step's timing on stderr. The exit status is the command's own "
                    "(signal N: 128+N); when no command ran it is 1 (rejected by routing), 75 (this host cannot "
                    "now: no slot, hypervisor down) or 76 (the job can never run here), with the reason on stderr.",
        usage="blahvm run [--config FILE] [submission options] [--user USER] -- COMMAND [ARG ...]",
    )
    add_config_option(parser)
    add_submission_options(parser)
    parser.add_argument("--user", help="run as this user (default: the caller); also routed on")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments")
    parser.set_defaults(run=run)


def _step(name: str, seconds: float, detail: str) -> None:
    print(printable(f"blahvm: {name:<9} {seconds:7.2f}s  {detail}".rstrip()), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return fail("run: no command given (blahvm run [options] -- COMMAND [ARG ...])")
    from blahvm.config import load_config
    from blahvm.lifecycle import run_job
    from blahvm.model import Job, Outcome, Rejection
    from blahvm.routing.engine import route

    complaint = bad_text(args, "user", "queue", "vo", "group", "account", "environment")
    if complaint:
        return fail(complaint)
    config = load_config(resolved_config_path(args))
    try:
        user = args.user or pwd.getpwuid(os.getuid()).pw_name
        account = account_of(user)
        submission = submission_from_args(args, user)
    except BadSubmission as error:
        return fail(str(error))

    start = time.perf_counter()
    decision = route(config, submission)
    if isinstance(decision, Rejection):
        _step("decision", time.perf_counter() - start, f"rejected: {decision.reason}")
        return EXIT_REJECTED
    _step("decision", time.perf_counter() - start, f"route {decision.rule}: queue {decision.queue}, "
          f"environment {decision.environment}, {decision.memory} x {decision.vcpus} vcpu")

    job = Job(job_id=f"run-{os.getpid()}-{int(time.time())}", user=user, decision=decision,
              uid=account.pw_uid, gid=account.pw_gid, name=" ".join(command)[:64])
    result = run_job(config, job, command, stdin=sys.stdin.fileno(), report=_step)
    if result.outcome is Outcome.OK:
        return result.exit_code
    print(f"blahvm: prepare: {printable(result.message)}", file=sys.stderr)
    return EXIT_RETRY if result.outcome is Outcome.RETRY_ELSEWHERE else EXIT_FAIL_JOB
