"""Errors any layer may raise or catch (stdlib only, so the lightest command can catch them)."""

from __future__ import annotations


class BlahvmError(Exception):
    """Something blahvm cannot do, with a message for the person reading it."""


class ConfigError(BlahvmError):
    """Every problem found in a configuration, reported at once (``problems``: one line each)."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def printable(text: object) -> str:
    """``text`` as one line without control characters, for a terminal or a log line.

    Job ids, user names, paths and job names come from users: a newline would forge a second line, an
    escape sequence would rewrite the admin's terminal, a lone surrogate (argv that is not UTF-8) would
    fail to print. Each such character is written as Python writes it in a string (``\\n``, ``\\x1b``,
    ``\\udced``); printable text, non-ASCII letters included, is left alone.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
