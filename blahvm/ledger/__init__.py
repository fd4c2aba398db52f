"""The host ledger: the durable state of one execution host (SQLite in WAL mode, stdlib only).

Which batch job owns which guest, clone volumes and slot, in which state, and where its seconds
went. Concurrent hooks share it safely: every write is one transaction under SQLite's write lock,
so the host never takes more guests, memory or vcpus than ``HostConfig`` offers.

    with Ledger(config.host) as ledger:
        entry = ledger.reserve(job.job_id, job.user, vo, environment, memory, vcpus)
        ledger.transition(job.job_id, State.RESERVED, State.CLONING, volumes=[...])
        ...
        ledger.close(job.job_id, Outcome.OK)
"""

from blahvm.ledger.capacity import check_fits, free_capacity, lowest_free_slot
from blahvm.ledger.database import FILENAME, SCHEMA_VERSION, ledger_path
from blahvm.ledger.entries import LIVE_STATES, Capacity, Consumed, Entry, State, Usage, may_follow
from blahvm.ledger.errors import LedgerBusy, LedgerError, NoCapacity
from blahvm.ledger.processes import owner_alive, process_start_time
from blahvm.ledger.store import Ledger

__all__ = [
    "Capacity",
    "Consumed",
    "Entry",
    "FILENAME",
    "LIVE_STATES",
    "Ledger",
    "LedgerBusy",
    "LedgerError",
    "NoCapacity",
    "SCHEMA_VERSION",
    "State",
    "Usage",
    "check_fits",
    "free_capacity",
    "ledger_path",
    "lowest_free_slot",
    "may_follow",
    "owner_alive",
    "process_start_time",
]
