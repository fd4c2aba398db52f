"""Exit codes of the execution-host commands, and the one-line step reports they print on stderr.

One table for every command that acts for a batch job (``prepare``, ``teardown``, ``reap``,
``capacity``), so a plugin or an admin's script reads the same number the same way everywhere.
The two failure codes are sysexits-style: 75 is ``EX_TEMPFAIL`` (try again, elsewhere or later).
"""

from __future__ import annotations

import sys

from blahvm.errors import printable

EXIT_OK = 0
EXIT_REJECTED = 1  # the site's routes refuse the submission
EXIT_BAD_INPUT = 2  # bad arguments, unknown user, bad config
EXIT_RETRY_ELSEWHERE = 75  # this host cannot now: no slot, hypervisor down, ledger locked
EXIT_FAIL_JOB = 76  # the job can never run: unknown environment, image fails its checksum

EXIT_CODES_HELP = """\
exit codes:
  0   done
  1   rejected by the site's routes (the reason is on stderr)
  2   bad arguments, unknown user or bad config
  75  retry elsewhere: this host cannot now (no free slot, hypervisor down)
  76  fail the job: it can never run (unknown environment, image fails its check)"""


def exit_code(outcome) -> int:
    """The exit code of a lifecycle ``Outcome``."""
    from blahvm.model import Outcome

    return {Outcome.OK: EXIT_OK, Outcome.RETRY_ELSEWHERE: EXIT_RETRY_ELSEWHERE,
            Outcome.FAIL_JOB: EXIT_FAIL_JOB}[outcome]


def step(message: str, seconds: float | None = None) -> None:
    """One line on stderr per step: stdout carries only the report a command was asked for."""
    timing = "" if seconds is None else f" ({seconds:.2f}s)"
    print(f"blahvm: {printable(message)}{timing}", file=sys.stderr, flush=True)
