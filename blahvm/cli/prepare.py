"""``blahvm prepare``: route a job as the batch system vouches for it, then make and boot its guest.

What a prologue does, by hand: the routing decision is re-derived here from the options (what the
batch system vouches for on this host), never taken from the job's environment.
"""

from __future__ import annotations

import argparse
import time

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, EXIT_REJECTED, exit_code, step
from blahvm.cli.submission import add_submission_options


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "prepare", help="route a job and boot its guest on this host (as a prologue does)",
        description="Route the submission with the site config, then clone, define and boot the job's guest "
                    "and wait until its agent answers. The job runs as USER's uid and gid from passwd; "
                    "without --group, USER's primary group is routed on. Steps and timings go to stderr.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--job-id", required=True, metavar="ID", help="the batch system's job id")
    parser.add_argument("--user", required=True, metavar="USER", help="the job's owner, e.g. cms001")
    add_submission_options(parser)
    parser.add_argument("--name", metavar="NAME", help="the job's name (shown and logged only)")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the guest is started, without waiting for its agent")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grp

    from blahvm.cli.submission import BadSubmission, account_of, submission_from_args
    from blahvm.config import load_config
    from blahvm.lifecycle import FROM_ENVIRONMENT, prepare
    from blahvm.model import Job
    from blahvm.routing.engine import route

    complaint = bad_text(args, "job-id", "user", "name", "queue", "vo", "group", "account", "environment")
    if complaint:
        return fail(complaint)
    try:
        account = account_of(args.user)
        if args.group is None:  # what a batch system passes on: the owner's primary group
            try:
                args.group = grp.getgrgid(account.pw_gid).gr_name
            except KeyError:
                pass
        submission = submission_from_args(args, args.user)
    except BadSubmission as error:
        return fail(str(error))
    config = load_config(resolved_config_path(args))

    started = time.monotonic()
    decision = route(config, submission)
    if not decision.accepted:
        by = f" by route {decision.rule}" if decision.rule else ""
        step(f"job {args.job_id}: rejected{by}: {decision.reason}")
        return EXIT_REJECTED
    step(f"job {args.job_id}: route {decision.rule}: queue {decision.queue}, environment {decision.environment}, "
         f"memory {decision.memory}, vcpus {decision.vcpus}", time.monotonic() - started)

    job = Job(job_id=args.job_id, user=args.user, decision=decision, uid=account.pw_uid, gid=account.pw_gid,
              name=args.name)
    result = prepare(config, job, ready_timeout=None if args.no_wait else FROM_ENVIRONMENT)
    if not result.reused:
        for phase, seconds in result.timings:
            step(f"job {args.job_id}: {phase}", seconds)
    step(result.message, time.monotonic() - started)
    return exit_code(result.outcome)
