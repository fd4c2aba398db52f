"""What can go wrong with the host ledger, each with a one-line message that says what to do."""

from __future__ import annotations


class LedgerError(Exception):
    """The ledger cannot be used: unreadable, corrupt, unsafe permissions, or written by a newer blahvm."""


class LedgerBusy(LedgerError):
    """Another process held the ledger's write lock for longer than the busy timeout."""


class NoCapacity(LedgerError):
    """The host cannot take this guest now, or (``ever_fits`` false) not even when empty.

    ``requested``, ``free`` and ``total`` are ints (``Size`` for memory, so they print with units).
    """

    def __init__(self, resource: str, requested: int, free: int, total: int) -> None:
        self.resource = resource  # "guests", "memory", "vcpus", "static guests" or "slots of queue Q"
        self.requested = requested
        self.free = free
        self.total = total
        if self.ever_fits:
            message = (
                f"no capacity on this host: {resource} exhausted "
                f"({requested} requested, {free} free of {total})"
            )
        else:
            message = (
                f"no capacity on this host: {resource} {requested} requested, "
                f"but it offers only {total} in all"
            )
        super().__init__(message)

    @property
    def ever_fits(self) -> bool:
        """Whether the request would fit once the host is empty (so: retry later or elsewhere)."""
        return self.requested <= self.total

    def __reduce__(self):  # picklable, so it crosses process boundaries intact
        return (type(self), (self.resource, self.requested, self.free, self.total))
