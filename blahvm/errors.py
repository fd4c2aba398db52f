"""Errors any layer may raise or catch (stdlib only, so the lightest command can catch them)."""

from __future__ import annotations


class BlahvmError(Exception):
    """Something blahvm cannot do, with a message for the person reading it."""


class ConfigError(BlahvmError):
    """Every problem found in a configuration, reported at once (``problems``: one line each)."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
