"""``blahvm lint``: routes that can never match, environments and queues nothing uses."""

from __future__ import annotations

import argparse

from blahvm.cli.common import add_config_option, resolved_config_path


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "lint", help="find shadowed routes and unused environments and queues",
        description="Report routes that can never match (shadowed by an earlier route, or impossible), routes "
                    "that accept more than their queue or environment allows, environments no route uses and "
                    "queues nothing routes to or matches on. Exit 0 nothing found, 1 findings, 2 bad config.",
    )
    add_config_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.routing.lint import lint

    config = load_config(resolved_config_path(args))
    findings = lint(config)
    for finding in findings:
        print(finding)
    return 1 if findings else 0
