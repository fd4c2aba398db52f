"""``blahvm resume``: resume a job's guest paused by ``blahvm suspend``."""

from __future__ import annotations

import argparse

from blahvm.cli.suspend import add_switch_parser, switch


def add_parser(commands) -> None:
    add_switch_parser(commands, "resume", "resume a job's paused guest",
                      "Resume the job's paused guest through the hypervisor: its payload goes on where it was. "
                      "A guest already running is fine (exit 0).")


def run(args: argparse.Namespace) -> int:
    return switch(args, "resume")
