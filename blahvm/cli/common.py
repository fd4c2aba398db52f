"""What several commands share: the --config option, checking user text, reporting a bad config."""

from __future__ import annotations

import argparse
import sys

from blahvm.errors import printable

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
        print(printable(problem), file=sys.stderr)
    count = len(problems)
    print(f"blahvm: the config has {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    return EXIT_BAD_INPUT


def fail(message: str) -> int:
    print(f"blahvm: {printable(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def bad_text(args: argparse.Namespace, *options: str):
    """The complaint about the first of ``options`` that cannot be a job's text, else None.

    Bytes that are not UTF-8 reach argv as lone surrogates: no ledger, log or guest can keep them.
    """
    for option in options:
        value = getattr(args, option.replace("-", "_"), None)
        if value is None:
            continue
        if option == "job-id" and not value.strip():
            return f"--{option}: must not be empty"
        if "\0" in value:
            return f"--{option}: must not contain a NUL byte"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"--{option}: {printable(value)} is not UTF-8 text"
    return None
