"""Configuration problems: one line each, with file, line, key path and a hint."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, List, Optional

import attrs

from blahvm.config.source import Document, Path
from blahvm.errors import ConfigError
from blahvm.quantities import shown


@attrs.frozen
class Problem:
    file: str
    line: Optional[int]
    path: Path
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = dotted(self.path)
        message = " ".join(self.message.split())  # one line per problem, whatever the parser said
        return f"{where}: {key}: {message}" if key else f"{where}: {message}"


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


class Problems:
    """Collects problems against one document, so every one is reported, not just the first."""

    def __init__(self, document: Document, filename: str):
        self.document = document
        self.filename = filename
        self.items: List[Problem] = [
            Problem(filename, line, path, "given twice; the first one would count") for path, line in document.duplicates
        ]

    def add(self, path: Path, message: str) -> None:
        self.items.append(Problem(self.filename, self.line(path), path, message))

    def line(self, path: Path) -> Optional[int]:
        # the nearest enclosing value that has a known line
        for end in range(len(path), -1, -1):
            line = self.document.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def text(self, path: Path) -> Optional[str]:
        return self.document.texts.get(path)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(sorted(self.items, key=lambda p: p.line or 0))  # stable: file order


def kind_of(value: Any) -> str:
    """What a config value is, for a message that says what was expected instead."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return shown(value)
