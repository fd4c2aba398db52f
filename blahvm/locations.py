"""Where blahvm looks for things by default (stdlib only: the submission hot path reads this)."""

from __future__ import annotations

import os

DEFAULT_CONFIG = "/etc/blahvm/site.yaml"
DEFAULT_CACHE_DIR = "/var/cache/blahvm"


def config_path(command_line=None, environ=os.environ) -> str:
    """For the admin's command line only: ``--config``, else ``$BLAHVM_CONFIG``, else the default.

    Hooks never call this: their path is fixed when they are installed, so a user's
    environment cannot choose the rules a job is routed by.
    """
    return command_line or environ.get("BLAHVM_CONFIG") or DEFAULT_CONFIG


def cache_dir(environ=os.environ) -> str:
    """For the admin's command line: ``$BLAHVM_CACHE_DIR``, else the default."""
    return environ.get("BLAHVM_CACHE_DIR") or DEFAULT_CACHE_DIR
