"""What several commands share: the --config option and reporting a bad config."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="site config (default: $BLAHVM_CONFIG, else /etc/blahvm/site.yaml)")


def resolved_config_path(args: argparse.Namespace) -> str:
    from blahvm.locations import config_path

    return config_path(args.config)


def report_config_error(error: Exception) -> int:
    problems = getattr(error, "problems", ())
    for problem in problems:
        print(problem, file=sys.stderr)
    count = len(problems)
    print(f"blahvm: the config has {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    return EXIT_BAD_INPUT


def fail(message: str) -> int:
    print(f"blahvm: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
