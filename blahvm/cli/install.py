"""``blahvm install SYSTEM``: put the hooks for one batch system in place (one module per system)."""

from __future__ import annotations

import importlib

SYSTEMS = ("lsf", "pbs", "slurm")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "install", help="install the hooks for a batch system",
        description="Install blahvm's hooks for a batch system, with the config path fixed into them.",
    )
    systems = parser.add_subparsers(title="batch systems", metavar="SYSTEM")
    for system in SYSTEMS:
        try:
            module = importlib.import_module(f"blahvm.cli.install_{system}")
        except ModuleNotFoundError as error:
            if error.name != f"blahvm.cli.install_{system}":
                raise
            continue
        module.add_parser(systems)
    parser.set_defaults(run=lambda args: parser.print_help() or 2)
