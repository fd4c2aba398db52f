"""``blahvm accounting``: one record per job run on this host, from the ledger (no hypervisor call)."""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from typing import Optional

from blahvm.cli.common import add_config_option, bad_text, fail, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, EXIT_OK, exit_code, step
from blahvm.errors import printable

COLUMNS = ("job", "user", "vo", "environment", "outcome", "closed", "provision", "wall", "cpu", "memory", "read",
           "written")
MiB = 1024**2


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "accounting", help="what each job's guest used: CPU, memory, disk, provisioning and wall time",
        description="Print one record per job run that ended on this host: user, VO, environment, outcome, "
                    "provisioning seconds (until the guest was running), wall seconds (from then until "
                    "teardown), the guest's CPU seconds, memory and disk bytes read and written, read from "
                    "libvirt before the guest was destroyed. Figures that could not be read are '-' (null).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--since", metavar="T",
                        help="only runs that ended at or after T: a date or time (2024-05-01, 2024-05-01T12:00, "
                             "local unless it has an offset) or a time ago (90m, 2d, 3600)")
    parser.add_argument("--job-id", metavar="ID", help="only this job's runs")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="one JSON object per line, one line per run")
    shape.add_argument("--apel", metavar="SITE",
                       help="an APEL individual job message (v0.3) for the GOCDB site SITE, for the APEL client "
                            "or SSM to publish; needs --hepspec; runs whose CPU time was lost are left out "
                            "(counted on stderr)")
    parser.add_argument("--hepspec", type=float, metavar="N",
                        help="with --apel: this host's HEPSPEC06 per processor (ServiceLevel)")
    parser.add_argument("--submit-host", metavar="CE",
                        help="with --apel: the CE's id (SubmitHost), e.g. ce01.example.org:9619/blah-slurm-grid "
                             "(default: this host's name)")
    parser.set_defaults(run=run)


def parse_since(text: Optional[str], now: float) -> float:
    """Seconds since the epoch; raises ValueError with a one-line message."""
    from blahvm.quantities import Duration, QuantityError

    if text is None:
        return 0.0
    try:
        return now - int(Duration.parse(text))
    except QuantityError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"--since: {text!r} is neither a date or time (2024-05-01, 2024-05-01T12:00) "
                         "nor a time ago (90m, 2d)") from None


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.lifecycle import accounting

    complaint = bad_text(args, "job-id")
    if complaint:
        return fail(complaint)
    try:
        since = parse_since(args.since, time.time())
    except ValueError as error:
        return fail(str(error))
    site = None
    if args.apel is not None:
        site = _apel_site(args)
        if isinstance(site, str):
            return fail(site)
    elif args.hepspec is not None or args.submit_host is not None:
        return fail("--hepspec and --submit-host go with --apel")
    config = load_config(resolved_config_path(args))
    report = accounting(config, since, args.job_id)
    if report.outcome.name != "OK":
        step(report.message)
        return exit_code(report.outcome)
    if site is not None:
        from blahvm.lifecycle.apel import apel_message

        message, skipped = apel_message(report.records, site)
        sys.stdout.write(message)
        if skipped:
            step(f"{skipped} run(s) left out of the APEL message: their guest's CPU time was lost")
    elif args.json:
        host = socket.gethostname()
        for record in report.records:
            sys.stdout.write(json.dumps(as_json(record, host)) + "\n")
    else:
        _print_table(report.records)
    return EXIT_OK


def _apel_site(args: argparse.Namespace):
    """The ApelSite the options describe, or a one-line complaint."""
    from blahvm.lifecycle.apel import ApelSite

    if args.hepspec is None:
        return "--apel needs --hepspec N: this host's HEPSPEC06 per processor"
    host = socket.getfqdn()
    try:
        return ApelSite(site=args.apel, submit_host=host if args.submit_host is None else args.submit_host,
                        machine=host, hepspec=args.hepspec)
    except ValueError as error:
        return f"--apel: {printable(str(error))}"


def as_json(record, host: str) -> dict:
    def seconds(value):
        return None if value is None else round(value, 3)

    return {
        "job_id": record.job_id, "user": record.user, "vo": record.vo, "environment": record.environment,
        "host": host, "outcome": None if record.outcome is None else record.outcome.value, "reason": record.reason,
        "start_time": round(record.started, 3), "end_time": round(record.closed, 3),
        "provision_seconds": seconds(record.provision_seconds), "wall_seconds": seconds(record.wall_seconds),
        "cpu_seconds": seconds(record.cpu_seconds), "vcpu_seconds": seconds(record.vcpu_seconds),
        "max_memory_bytes": record.max_memory_bytes, "disk_read_bytes": record.disk_read_bytes,
        "disk_write_bytes": record.disk_write_bytes, "note": record.note,
    }


def _print_table(records) -> None:
    if not records:
        print("no job ended on this host in that time")
        return
    cells = [[c.upper() for c in COLUMNS]]
    for r in records:
        closed = datetime.datetime.fromtimestamp(r.closed).strftime("%Y-%m-%d %H:%M:%S")
        cells.append([
            printable(r.job_id), printable(r.user), printable(r.vo or "-"), printable(r.environment),
            "-" if r.outcome is None else r.outcome.value, closed, f"{r.provision_seconds:.1f}s",
            f"{r.wall_seconds:.1f}s", "-" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}s",
            _mib(r.max_memory_bytes), _mib(r.disk_read_bytes), _mib(r.disk_write_bytes),
        ])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / MiB:.1f}MiB"
