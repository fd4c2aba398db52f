"""``warm``: make the templates of a site's environments ahead of the jobs that start from them.

The shape made is the environment's own (its ``memory`` and ``vcpus``), what a job that asks for no
less gets. An environment whose jobs always boot (``templates.why_not``) is reported with why.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Tuple

import attrs

from blahvm.hypervisor.images import verify_image
from blahvm.lifecycle import templates
from blahvm.lifecycle._common import connect
from blahvm.model import SiteConfig


@attrs.frozen
class Warmed:
    environment: str
    key: Optional[str] = None  # None: no template (``skipped`` says why, or another process makes it)
    state_size: int = 0
    disk_size: int = 0
    seconds: float = 0.0
    made: bool = False  # False: it was there already
    skipped: Optional[str] = None


def warm(config: SiteConfig, names: Optional[Sequence[str]] = None) -> Tuple[Warmed, ...]:
    """A template for each environment named (every one by default); KeyError for an unknown name.
    Hypervisor and image errors are raised as they are (the caller maps their outcome)."""
    chosen = list(config.environments) if not names else list(names)
    for name in chosen:
        if name not in config.environments:
            raise KeyError(name)
    done = []
    with connect(config) as conn:
        for name in chosen:
            environment = config.environments[name]
            why = "its guests are leased static guests" if environment.guests else templates.why_not(environment)
            if why is None and conn.uri.startswith("test:"):
                why = "libvirt's test driver saves no guest states"
            if why is not None:
                done.append(Warmed(name, skipped=why))
                continue
            started = time.monotonic()
            golden = verify_image(environment.name, environment.image, environment.sha256, config.host.state_dir)
            made = templates.make(config, conn, environment, golden,
                                  templates.Shape(environment.memory, environment.vcpus))
            if made is None:
                done.append(Warmed(name, skipped="another process is making it now"))
                continue
            template = made.template
            done.append(Warmed(name, template.key, template.state_size, template.disk_size,
                               time.monotonic() - started, made.made))
    return tuple(done)
