"""The esub parameter file (``$LSB_SUB_PARM_FILE``), read without a shell.

LSF writes one ``NAME=value`` per line, meant for ``. $LSB_SUB_PARM_FILE``: strings in double
quotes, booleans ``Y``, integers bare, ``SUB_RESET`` for an option a ``bmod`` removes. It does not
escape the quotes inside ``LSB_SUB_COMMAND_LINE`` (``"./job a1 "a 2""``), and a ``$(...)`` in a
user's command line would run if the file were sourced. So it is parsed here, tolerantly: a
quoted value runs to the last ``"`` on its line, and nothing in it is ever expanded.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional, Union

RESET = object()  # the value of an option ``bmod -Xn`` removed (``NAME=SUB_RESET``)

_ASSIGNMENT = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z", re.S)
# values LSF writes unescaped: the command line as typed
_RAW = frozenset(("LSB_SUB_COMMAND_LINE", "LSB_SUB_COMMANDNAME"))
_SH_ESCAPE = re.compile(r'\\([\\"$`])')


class ParamError(ValueError):
    """The parameter file cannot be read at all."""


def _unquote(name: str, value: str) -> "Union[str, object]":
    value = value.rstrip("\r")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        if value[0] == '"' and name not in _RAW:
            inner = _SH_ESCAPE.sub(r"\1", inner)
        return inner
    if value.startswith('"'):  # an unterminated quote: keep what there is
        return value[1:]
    value = value.strip()
    return RESET if value == "SUB_RESET" else value


def parse_params(text: str) -> "Dict[str, Union[str, object]]":
    """``NAME -> value`` (a str, or ``RESET``); a later line for the same name wins.

    Lines that are not assignments continue a quoted value begun above them (a value with a
    newline in it), or are ignored. Never raises on any text.
    """
    values: "Dict[str, Union[str, object]]" = {}
    pending: "Optional[list]" = None  # [name, text so far] of a quoted value still open
    for line in text.split("\n"):
        match = _ASSIGNMENT.match(line)
        if pending is not None and match is None:
            pending[1] += "\n" + line
            if line.rstrip("\r").endswith('"'):
                values[pending[0]] = _unquote(pending[0], pending[1])
                pending = None
            continue
        if pending is not None:  # a new assignment closes an unterminated value
            values[pending[0]] = _unquote(pending[0], pending[1])
            pending = None
        if match is None:
            continue
        name, value = match.group(1), match.group(2)
        stripped = value.rstrip("\r")
        if stripped.startswith('"') and (len(stripped) < 2 or not stripped.endswith('"')):
            pending = [name, value]
            continue
        values[name] = _unquote(name, value)
    if pending is not None:
        values[pending[0]] = _unquote(pending[0], pending[1])
    return values


def read_params(path: str) -> "Dict[str, Union[str, object]]":
    """Parse the file at ``path``; ``ParamError`` with one line if it cannot be read."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read(1 << 22)
    except OSError as error:
        raise ParamError(f"cannot read the parameter file {path!r}: {error.strerror or error}") from None
    return parse_params(raw.decode("utf-8", "replace").replace("\x00", ""))


_SAFE_VALUE = re.compile(r"[A-Za-z0-9 _.,:;=<>!&|()\[\]*+/~{}@%-]*\Z")


def assignment(name: str, value: "Union[str, int]", quote: bool = True) -> str:
    """One line for ``$LSB_SUB_MODIFY_FILE`` / ``$LSB_SUB_MODIFY_ENVFILE``.

    Only values from a safe alphabet are ever written (no quote, backslash, ``$``, backquote or
    newline), so the line means the same to LSF's own reader and to a shell.
    """
    text = str(value)
    if not _SAFE_VALUE.match(text):
        raise ValueError(f"refusing to write {name}={text!r}: it has characters LSF files cannot carry safely")
    return f'{name}="{text}"\n' if quote else f"{name}={text}\n"


def flag(values: dict, name: str) -> bool:
    value = values.get(name)
    return isinstance(value, str) and value.strip().upper() in ("Y", "YES", "1", "TRUE")
