"""``blahvm guests``: the ledger's live entries and libvirt's blahvm guests, side by side.

An entry whose guest is gone and a guest no entry owns are flagged: they are exactly what
``blahvm reap`` would clean, because the flags come from a dry run of reap itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from blahvm.cli.common import add_config_option, resolved_config_path
from blahvm.cli.outcomes import EXIT_OK, exit_code, step
from blahvm.errors import printable

COLUMNS = ("job", "user", "vo", "environment", "ledger", "libvirt", "slot", "age", "timings", "flag")
NO_GUEST = "no guest: reap closes it"
NO_ENTRY = "no entry: reap removes it"
MAKING = "making template t-{key}: reap leaves it while its maker lives"
MAKER_DIED = "template t-{key} whose maker died: reap removes it"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "guests", help="live jobs in the ledger and blahvm guests in libvirt, side by side",
        description="List this host's live ledger entries next to libvirt's blahvm guests: job id, user, "
                    "VO, environment, state in each, slot, age and seconds per phase. Entries without a "
                    "guest and guests without an entry are flagged: that is what 'blahvm reap' cleans. "
                    "When libvirt cannot be reached, the ledger side is shown alone (exit 0).",
    )
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.ledger import Ledger, LedgerError
    from blahvm.model import Outcome

    config = load_config(resolved_config_path(args))
    try:
        with Ledger(config.host) as ledger:
            entries = ledger.live()
    except LedgerError as error:
        step(f"guests: {error}")
        return exit_code(Outcome.RETRY_ELSEWHERE)
    listed, would_reap = _hypervisor_side(config)
    rows = _rows(entries, listed, would_reap, time.time(), config)
    if args.json:
        leftovers = None if would_reap is None else {"volumes": list(would_reap.volumes),
                                                      "run_dirs": list(would_reap.run_dirs)}
        json.dump({"hypervisor": config.hypervisor.uri, "libvirt_reachable": listed is not None,
                   "guests": rows, "reap_would_remove": leftovers, "templates": _templates(config)}, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(rows)
        for template in _templates(config):  # what each saved state costs on disk
            print(f"template t-{template['key']} of {printable(template['environment'])} "
                  f"({int(template['memory'] or 0) // 1024**2}MiB, {template['vcpus']} vcpus): state "
                  f"{template['state_size'] / 1024**2:.1f}MiB, disk {template['disk_size'] / 1024**2:.1f}MiB")
        if would_reap is not None and (would_reap.volumes or would_reap.run_dirs):
            print(f"reap would also remove {len(would_reap.volumes)} volumes and "
                  f"{len(would_reap.run_dirs)} run dirs that no live job owns")
    return EXIT_OK


def _templates(config) -> list:
    from blahvm.lifecycle import templates

    keys = ("key", "environment", "memory", "vcpus", "state_size", "disk_size", "made")
    return [{key: record.get(key) for key in keys} for record in templates.listing(config)]


def _hypervisor_side(config):
    """libvirt's blahvm guests and reap's dry run; (None, None) with a warning if libvirt is down."""
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.errors import HypervisorError
    from blahvm.hypervisor.guests import list_blahvm_guests
    from blahvm.lifecycle import reap

    uri = config.hypervisor.uri
    try:
        # The dry run shares this open connection's lifetime (test:///default lives as long as one does).
        with open_connection(uri, timeout=float(config.hypervisor.timeout)) as conn:
            listed = list_blahvm_guests(conn)
            report = reap(config, dry_run=True)
    except HypervisorError as error:
        step(f"warning: showing the ledger only: {error}")
        return None, None
    if report.outcome.name != "OK":
        step(f"warning: cannot tell what reap would clean: {report.message}")
        return listed, None
    return listed, report


def _rows(entries, listed, would_reap, now: float, config) -> list:
    import socket

    from blahvm.lifecycle import templates

    by_name = {guest.name: guest for guest in listed or ()}
    closing = set(() if would_reap is None else would_reap.entries_closed)
    removing = set(() if would_reap is None else would_reap.guests)
    rows = []
    for entry in entries:
        guest = by_name.pop(entry.guest, None) if entry.guest else None
        libvirt_state = None if listed is None else (guest.state if guest else "absent")
        rows.append(_row(entry.job_id, entry.user, entry.vo, entry.environment, entry.guest, str(entry.state),
                         libvirt_state, entry.slot, now - entry.created, dict(entry.timings),
                         NO_GUEST if entry.job_id in closing else None))
    for guest in by_name.values():  # guests no live entry owns
        meta = guest.metadata
        ours = meta.ledger == config.host.state_dir and meta.host == socket.gethostname()
        key = templates.key_of_guest(guest.name) if ours else None
        if key is not None:  # a template's guest, no job's: it runs nothing; reap leaves it while its maker lives
            flag = MAKER_DIED if guest.name in removing else MAKING
            rows.append(_row(None, meta.user, None, meta.environment, guest.name, None, guest.state, None,
                             now - meta.created, {}, flag.format(key=key), template=key))
            continue
        flag = NO_ENTRY if guest.name in removing else f"no entry: {_whose(guest, config)}, reap leaves it"
        rows.append(_row(meta.job_id, meta.user, meta.vo, meta.environment, guest.name, None, guest.state, None,
                         now - meta.created, {}, flag))
    return rows


def _whose(guest, config) -> str:
    """Why reap leaves a guest no entry owns, as its metadata tells (reap's own rules, in words)."""
    import socket

    meta = guest.metadata
    if meta.host != socket.gethostname():
        return f"made by host {meta.host}"
    if meta.ledger not in (None, config.host.state_dir):
        return f"made by another blahvm installation (state dir {meta.ledger})"
    if any(guest.name in environment.guests for environment in config.environments.values()):
        return "a static guest of this site"
    return "not reap's to remove"


def _row(job_id, user, vo, environment, guest, ledger_state, libvirt_state, slot, age, timings, flag,
         template=None) -> dict:
    return {"job_id": job_id, "template": template, "user": user, "vo": vo, "environment": environment, "guest": guest,
            "ledger_state": ledger_state, "libvirt_state": libvirt_state, "slot": slot,
            "age_seconds": round(max(age, 0.0), 1), "timings": {k: round(v, 3) for k, v in timings.items()},
            "flag": flag}


def _print_table(rows: list) -> None:
    if not rows:
        print("no live jobs and no blahvm guests")
        return
    cells = [[c.upper() for c in COLUMNS]]
    for row in rows:
        cells.append([
            "-" if row["job_id"] is None else printable(row["job_id"]), printable(row["user"]),
            printable(row["vo"] or "-"),
            printable(row["environment"]), row["ledger_state"] or "-",
            "?" if row["libvirt_state"] is None else row["libvirt_state"],
            "-" if row["slot"] is None else str(row["slot"]), _age(row["age_seconds"]),
            " ".join(f"{phase} {seconds:.2f}s" for phase, seconds in row["timings"].items()) or "-",
            printable(row["flag"] or ""),
        ])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _age(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // subsize
            return f"{seconds // size}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{seconds}s"
