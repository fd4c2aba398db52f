"""``blahvm reap``: remove guests, clones and run dirs no live job owns; close entries whose guest died."""

from __future__ import annotations

import argparse
import json
import sys
import time

from blahvm.cli.common import add_config_option, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, exit_code, step
from blahvm.errors import printable


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "reap", help="clean up after crashes (guests, clones and slots no live job owns)",
        description="Close ledger entries whose guest vanished or whose owner died half-way, and remove "
                    "blahvm guests, clone volumes and run directories that no live entry owns. Prints one "
                    "line per thing removed (or, with --dry-run, that would be).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.lifecycle import reap

    config = load_config(resolved_config_path(args))
    started = time.monotonic()
    report = reap(config, dry_run=args.dry_run)
    if report.outcome.name == "OK":
        found = {"entries": report.entries_closed, "guests": report.guests, "volumes": report.volumes,
                 "run_dirs": report.run_dirs}
        if args.json:
            json.dump({"dry_run": report.dry_run, **{kind: list(names) for kind, names in found.items()}},
                      sys.stdout)
            sys.stdout.write("\n")
        else:
            _print_text(found, report.dry_run)
    step(report.message, time.monotonic() - started)
    return exit_code(report.outcome)


def _print_text(found: dict, dry_run: bool) -> None:
    verbs = {"entries": "would close" if dry_run else "closed"}
    labels = {"entries": "entry", "guests": "guest", "volumes": "volume", "run_dirs": "run dir"}
    for kind, names in found.items():
        verb = verbs.get(kind, "would remove" if dry_run else "removed")
        for name in names:
            print(f"{verb} {labels[kind]} {printable(name)}")
