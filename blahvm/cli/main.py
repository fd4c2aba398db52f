"""``blahvm``: check a config, dry-run a route, lint, and (per command module) much more."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from blahvm._version import __version__

# Command modules, in the order --help lists them.
COMMANDS = ("check", "route", "lint", "run", "prepare", "teardown", "suspend", "resume", "follow", "guests",
            "capacity", "accounting", "reap", "install", "image")

EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug in blahvm, not in the input


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blahvm",
        description="Run every batch job inside a freshly cloned virtual machine chosen by site rules.",
        epilog="The config is --config FILE, else $BLAHVM_CONFIG, else /etc/blahvm/site.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"blahvm {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"blahvm.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"blahvm.cli.{name}":
                raise
            continue  # a command this installation does not ship
        module.add_parser(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    from blahvm.cli.common import report_config_error
    from blahvm.errors import ConfigError

    try:
        return args.run(args)
    except ConfigError as error:  # every command that reads the config reports it the same way
        return report_config_error(error)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    except Exception as error:  # the last line of defence: one line, not a traceback
        if os.environ.get("BLAHVM_DEBUG"):
            raise
        from blahvm.errors import printable

        print(f"blahvm: internal error: {type(error).__name__}: {printable(error)} "
              "(run again with BLAHVM_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
