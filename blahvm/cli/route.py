"""``blahvm route``: dry-run the routing of one submission; exit 0 routed, 1 rejected, 2 bad input.

Runs on the compiled route table, as the submission hooks do, so it answers exactly as they would.
"""

from __future__ import annotations

import argparse
import sys

from blahvm.cli.common import add_config_option, fail, resolved_config_path
from blahvm.cli.submission import add_submission_options

EXIT_ROUTED, EXIT_REJECTED = 0, 1


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "route", help="dry-run the routing of a submission",
        description="Show which queue and environment a submission would get, or why it is rejected. "
                    "Exit 0 routed, 1 rejected, 2 bad config or arguments.",
    )
    add_config_option(parser)
    parser.add_argument("--user", metavar="USER", help="e.g. cms001")
    add_submission_options(parser)
    parser.add_argument("--explain", action="store_true", help="say why each earlier route did not match")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.locations import cache_dir
    from blahvm.quantities import Duration, QuantityError, Size, parse_count
    from blahvm.routing.fast import load_table
    from blahvm.routing.table import FIELDS

    try:
        facts = [getattr(args, field) for field in FIELDS]
        facts[FIELDS.index("walltime")] = None if args.walltime is None else int(Duration.parse(args.walltime))
        facts[FIELDS.index("memory")] = None if args.memory is None else int(Size.parse(args.memory))
        if args.cores is not None:
            facts[FIELDS.index("cores")] = parse_count(args.cores, "cores")
    except QuantityError as error:
        return fail(str(error))
    table = load_table(resolved_config_path(args), cache_dir())
    trace = [] if args.explain else None
    result = table.decide(tuple(facts), trace)
    if args.json:
        _print_json(result, trace)
    else:
        _print_text(result, trace)
    return EXIT_ROUTED if result[0] == "route" else EXIT_REJECTED


def _print_text(result, trace) -> None:
    from blahvm.errors import printable
    from blahvm.routing.table import MEMORY, WALLTIME, show

    # each line may carry the user's own values (queue, vo, ...): printable keeps it one clean line
    for rule, why_not in trace or ():
        print(printable(f"  {rule}: " + ("matches" if why_not is None else f"no: {why_not}")))
    if result[0] == "reject":
        print(printable(f"rejected by route {result[1]}: {result[2]}" if result[1] else f"rejected: {result[2]}"))
        return
    _, rule, queue, environment, vo, memory, vcpus, walltime, resources = result
    details = f"vo {vo or '-'}, memory {show(MEMORY, memory)}, vcpus {vcpus}, walltime {show(WALLTIME, walltime)}"
    if resources:
        details += f", resources {resources}"
    print(printable(f"route {rule}: queue {queue}, environment {environment} ({details})"))


def _print_json(result, trace) -> None:
    import json

    from blahvm.routing.table import MEMORY, WALLTIME, show

    out = dict.fromkeys(("decision", "queue", "environment", "rule", "reason", "vo", "memory", "vcpus",
                         "walltime", "resources"))
    if result[0] == "reject":
        out.update(decision="reject", rule=result[1], reason=result[2])
    else:
        _, rule, queue, environment, vo, memory, vcpus, walltime, resources = result
        out.update(decision="route", queue=queue, environment=environment, rule=rule, vo=vo, memory=show(MEMORY, memory),
                   vcpus=vcpus, walltime=None if walltime is None else show(WALLTIME, walltime),
                   resources=resources)
    if trace is not None:
        out["explain"] = [{"rule": rule, "matched": why is None, "why_not": why} for rule, why in trace]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
