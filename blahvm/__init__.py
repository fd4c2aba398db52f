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
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'blahvm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
