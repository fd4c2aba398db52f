"""``blahvm capacity``: what this host can still take, from its ledger (no hypervisor call)."""

from __future__ import annotations

import argparse
import json
import sys

from blahvm.cli.common import add_config_option, resolved_config_path
from blahvm.cli.outcomes import EXIT_CODES_HELP, exit_code, step


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "capacity", help="free slots, memory and vcpus, and the environments that fit now",
        description="Show the free guest slots, memory and vcpus of this host and which environments one "
                    "more guest of would fit now (what elim or exechost_periodic report).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.lifecycle import capacity

    config = load_config(resolved_config_path(args))
    free = capacity(config)
    if free.outcome.name != "OK":
        step(free.message)
        return exit_code(free.outcome)
    host = config.host
    if args.json:
        json.dump({
            "guests_free": free.guests, "guests_total": host.max_guests,
            "memory_free": _shown(free.memory), "memory_total": _shown(host.memory),
            "vcpus_free": free.vcpus, "vcpus_total": host.vcpus,
            "environments": list(free.environments),
            "queue_slots_free": dict(free.queues),
        }, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"guests  {free.guests} free of {host.max_guests}")
        print(f"memory  {_of(free.memory, host.memory)}")
        print(f"vcpus   {_of(free.vcpus, host.vcpus)}")
        print(f"fits now: {', '.join(free.environments) or 'none'}")
        if free.queues:
            print("queue slots free: " + ", ".join(f"{name} {count}" for name, count in free.queues))
    return exit_code(free.outcome)


def _shown(value):
    return None if value is None else str(value)


def _of(free, total) -> str:
    return "unlimited" if total is None else f"{free} free of {total}"
