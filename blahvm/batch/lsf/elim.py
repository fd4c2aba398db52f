"""The elim: report the host's guest slots and which environments fit, for LSF's scheduler.

``blahvm_slots`` is the number of guests LSF may run here: free slots plus those held by guests of
jobs now. The esub reserves one for each job (``rusage[blahvm_slots=1]``) and LSF subtracts the
reservations of running jobs from what the elim reports: reporting only the *free* slots would
count every running guest twice (seen on volclava 2.2: one guest at a time with ``max_guests: 2``).

Protocol (LIM reads our stdout): ``N name1 value1 ... nameN valueN`` on one line, written whole.
The values are sampled every ``interval`` seconds (15, LIM's own period) and a line goes out when
they change, or every fourth sample regardless. While libvirt cannot be reached every value is 0:
no job is sent to a host that cannot start its guest, and the elim keeps running. On a host
without blahvm (no config) it exits with ``$ELIM_ABORT_VALUE`` so that LIM never restarts it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import List, Mapping, Optional, Tuple

from blahvm.batch.lsf import DEFAULT_ELIM_ABORT_VALUE
from blahvm.batch.lsf.resreq import SLOTS, environment_resource

HOOK = "elim"
REPEAT_EVERY = 4  # samples: an unchanged line is repeated this often


def sample(config) -> List[Tuple[str, int]]:
    """(resource, value) pairs for this host now."""
    from blahvm.hypervisor.errors import HypervisorError
    from blahvm.ledger import Ledger
    from blahvm.ledger.errors import LedgerError
    from blahvm.lifecycle import capacity
    from blahvm.lifecycle._common import connect
    from blahvm.model import Outcome

    names = [SLOTS] + [environment_resource(name) for name in sorted(config.environments)]
    zeros = [(name, 0) for name in names]
    try:
        with connect(config):
            pass
    except HypervisorError:
        return zeros
    free = capacity(config)
    if free.outcome is not Outcome.OK:
        return zeros
    try:
        with Ledger(config.host) as ledger:
            held = len(ledger.live())
    except LedgerError:
        return zeros
    fitting = set(free.environments)
    slots = min(max(free.guests, 0) + held, config.host.max_guests)
    return [(SLOTS, slots)] + [
        (environment_resource(name), int(name in fitting)) for name in sorted(config.environments)
    ]


def line(values: List[Tuple[str, int]]) -> str:
    return f"{len(values)} " + " ".join(f"{name} {value}" for name, value in values) + "\n"


def elim(config: str, interval: float = 15.0, environ: Optional[Mapping[str, str]] = None,
         samples: Optional[int] = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        abort = int(environ.get("ELIM_ABORT_VALUE", ""))
    except ValueError:
        abort = DEFAULT_ELIM_ABORT_VALUE
    from blahvm.batch.log import log_event
    from blahvm.config import load_config
    from blahvm.errors import ConfigError

    if not os.path.exists(config):
        log_event(HOOK, f"no blahvm config at {config}: this host offers no guests")
        return abort
    try:
        site = load_config(config)
    except ConfigError as error:
        problems = getattr(error, "problems", None) or [error]
        log_event(HOOK, f"the blahvm config is broken ({problems[0]}): this host offers no guests")
        return abort
    ours = {SLOTS} | {environment_resource(name) for name in site.environments}
    expected = environ.get("LSF_RESOURCES", "").split()
    if expected and not ours.intersection(expected):
        log_event(HOOK, f"LSF maps none of {sorted(ours)} to this host", log_file=site.host.log_file)
        return abort

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    last: Optional[str] = None
    unchanged = 0
    count = 0
    while not stopping:
        try:
            text = line(sample(site))
        except Exception as error:  # never die for a transient failure: report nothing free
            log_event(HOOK, f"sampling failed: {type(error).__name__}: {error}", log_file=site.host.log_file)
            text = line([(name, 0) for name in sorted(ours)])
        if text != last or unchanged >= REPEAT_EVERY - 1:
            try:
                os.write(1, text.encode())
            except OSError:
                return 0  # LIM went away
            last, unchanged = text, 0
        else:
            unchanged += 1
        count += 1
        if samples is not None and count >= samples:
            break
        deadline = time.monotonic() + interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    return 0
