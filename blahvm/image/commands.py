"""Running the external tools of an image build, with failures turned into one-line errors."""

from __future__ import annotations

import subprocess
from typing import Mapping, Optional, Sequence

from blahvm.image.errors import ImageBuildError


def run(argv: Sequence[str], cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> str:
    """Run ``argv`` (never through a shell) and return its stdout; raise ImageBuildError on failure."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise ImageBuildError(
            f"{argv[0]} not found: install the system packages (scripts/install-system-packages)"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E:")]  # apt's error lines
        detail = (errors or lines or [f"exit status {done.returncode}"])[-1]
        raise ImageBuildError(f"{' '.join(argv[:2])} failed: {detail}")
    return done.stdout
