"""``blahvm follow``: pause a job's guest while the batch system has its starter stopped, resume it with it."""

from __future__ import annotations

import argparse

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, exit_code, step


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "follow", help="pause a job's guest while its starter is stopped (a suspended job)",
        description="Run beside a job, as root, until its starters exit: while any of the processes given is "
                    "stopped (the batch system suspended the job with SIGSTOP), the job's guest is paused; "
                    "once none is, it is resumed. A pause it did not make is left alone.",
        epilog=f"{EXIT_CODES_HELP}\n(76 here: the job has no running guest on this host)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--job-id", required=True, metavar="ID", help="the batch system's job id")
    parser.add_argument("--pid", required=True, type=int, action="append", metavar="PID",
                        help="a starter process of the job (again for each)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.lifecycle import follow

    complaint = bad_text(args, "job-id")
    if complaint:
        return fail(complaint)
    if any(pid <= 0 for pid in args.pid):
        return fail("--pid: must be a process id above 0")
    config = load_config(resolved_config_path(args))
    result = follow(config, args.job_id, args.pid)
    step(result.message)
    return exit_code(result.outcome)
