"""``blahvm teardown``: remove everything of a job's guest and free its slot (as an epilogue does)."""

from __future__ import annotations

import argparse

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, exit_code, step


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "teardown", help="destroy a job's guest, delete its clones, free its slot",
        description="Destroy and undefine the job's guest whatever state it is in, delete its clone volumes "
                    "and run directory, and close its ledger entry. Nothing left is fine (exit 0).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--job-id", required=True, metavar="ID", help="the batch system's job id")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.lifecycle import teardown

    complaint = bad_text(args, "job-id")
    if complaint:
        return fail(complaint)
    config = load_config(resolved_config_path(args))
    result = teardown(config, args.job_id)
    step(result.message)  # it carries its own timing
    return exit_code(result.outcome)
