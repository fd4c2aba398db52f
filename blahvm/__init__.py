"""blahvm: run every batch job inside a freshly cloned virtual machine chosen by site rules.

The public API, documented in docs/api.md, is importable from here. It is loaded on first use,
so that hooks which only route (on every job submission) do not pay for what they do not use.
"""

from blahvm._version import __version__

_PUBLIC = {
    "load_config": "blahvm.config",
    "ConfigError": "blahvm.config",
    "route": "blahvm.routing.engine",
    "Router": "blahvm.routing.engine",
    "Outcome": "blahvm.model",
    "Submission": "blahvm.model",
    "Decision": "blahvm.model",
    "Rejection": "blahvm.model",
    "Environment": "blahvm.model",
    "Queue": "blahvm.model",
    "Route": "blahvm.model",
    "SiteConfig": "blahvm.model",
    "Job": "blahvm.model",
    "Duration": "blahvm.quantities",
    "Size": "blahvm.quantities",
    "QuantityError": "blahvm.quantities",
    "prepare": "blahvm.lifecycle",
    "wait_ready": "blahvm.lifecycle",
    "launch": "blahvm.lifecycle",
    "teardown": "blahvm.lifecycle",
    "capacity": "blahvm.lifecycle",
    "reap": "blahvm.lifecycle",
    "run_job": "blahvm.lifecycle",
    "suspend": "blahvm.lifecycle",
    "resume": "blahvm.lifecycle",
    "follow": "blahvm.lifecycle",
    "accounting": "blahvm.lifecycle",
    "LAUNCH_FAILED": "blahvm.lifecycle",
    "PrepareResult": "blahvm.lifecycle",
    "ReadyResult": "blahvm.lifecycle",
    "TeardownResult": "blahvm.lifecycle",
    "Capacity": "blahvm.lifecycle",
    "ReapReport": "blahvm.lifecycle",
    "RunResult": "blahvm.lifecycle",
    "SuspendResult": "blahvm.lifecycle",
    "AccountingReport": "blahvm.lifecycle",
    "AccountingRecord": "blahvm.lifecycle",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'blahvm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
