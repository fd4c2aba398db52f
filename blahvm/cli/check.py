"""``blahvm check``: validate a site config; exit 0 valid, 2 listing every problem."""

from __future__ import annotations

import argparse

from blahvm.cli.common import add_config_option, resolved_config_path


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "check", help="validate a site config",
        description="Validate a site config and report every problem at once (exit 0 valid, 2 invalid). "
                    "Where it may, it also refreshes the compiled route table that submission hooks use.",
    )
    add_config_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.locations import cache_dir
    from blahvm.routing.fast import write_cache
    from blahvm.routing.table import compile_table

    path = resolved_config_path(args)
    config = load_config(path)  # a bad config is reported by the command line's entry point
    with open(path, "rb") as stream:
        cached = write_cache(cache_dir(), path, stream.read(), compile_table(config))
    print(f"{path}: valid: {len(config.environments)} environments, {len(config.queues)} queues, "
          f"{len(config.routes)} routes" + ("" if cached else " (route table not cached: cache dir not writable)"))
    return 0
