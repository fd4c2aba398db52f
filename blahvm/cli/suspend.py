"""``blahvm suspend``: pause a job's guest, so that no CPU time passes in it until ``blahvm resume``."""

from __future__ import annotations

import argparse

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, exit_code, step

HELP_76 = "(76 here: the job has no running guest on this host)"


def add_parser(commands) -> None:
    add_switch_parser(commands, "suspend", "pause a job's guest (no CPU time passes in it)",
                      "Pause the job's running guest through the hypervisor: its payload makes no progress, its "
                      "memory and disks stay. A guest already paused is fine (exit 0).")


def add_switch_parser(commands, name: str, help: str, description: str) -> None:
    parser = commands.add_parser(name, help=help, description=description,
                                 epilog=f"{EXIT_CODES_HELP}\n{HELP_76}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(parser)
    parser.add_argument("--job-id", required=True, metavar="ID", help="the batch system's job id")
    parser.set_defaults(run=lambda args: switch(args, name))


def run(args: argparse.Namespace) -> int:
    return switch(args, "suspend")


def switch(args: argparse.Namespace, name: str) -> int:
    from blahvm.config import load_config
    from blahvm import lifecycle

    complaint = bad_text(args, "job-id")
    if complaint:
        return fail(complaint)
    config = load_config(resolved_config_path(args))
    result = getattr(lifecycle, name)(config, args.job_id)
    step(result.message)
    return exit_code(result.outcome)
