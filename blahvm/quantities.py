"""Durations and sizes, parsed once into exact integers.

Stdlib only and free of ``re``: this module is on the submission hot path.

Durations (whole seconds):
  ``3600`` or ``3600s`` seconds; ``90m``, ``10h``, ``2d``, ``1w``; compounds ``1h30m``;
  ``[[H:]M:]S`` clock form as PBS writes it (``10:00:00``; two fields mean ``M:S``).

Sizes (whole bytes):
  binary: ``KiB MiB GiB TiB`` (also ``Ki Mi Gi Ti``) and the single letters ``K M G T``
  as batch systems use them (``--mem=2G`` is 2 GiB);
  decimal: ``kB MB GB TB``; bare number or ``B``: bytes.
  Unit letters are case-insensitive (``2gib`` == ``2GiB``).
  A fraction is allowed when it comes out whole: ``1.5GiB``, but not ``1.5B``.

Both stay below 2**63 (``MAX``), so every value fits the 64-bit integers of SQLite and libvirt, and a
number is at most ``MAX_DIGITS`` characters long: what is parsed is bounded before ``int()`` sees it.
"""

from __future__ import annotations

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_SIZE_UNITS = {"b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[_p] = 1024**_i
    _SIZE_UNITS[_p + "i"] = 1024**_i
    _SIZE_UNITS[_p + "ib"] = 1024**_i
    _SIZE_UNITS[_p + "b"] = 1000**_i

_DIGITS = frozenset("0123456789")

MAX = 2**63 - 1  # the largest Duration or Size: a signed 64-bit integer
MAX_DIGITS = 40  # longer than any useful number (19 digits and a fraction); int() refuses past 4300


class QuantityError(ValueError):
    """A duration or size that cannot be read; the message says what is expected."""


class QuantityTooLarge(QuantityError):
    """A number past ``MAX`` or ``MAX_DIGITS`` (a caller with a tighter bound may say so instead)."""


def shown(original: object) -> str:
    """The offending value in a message, cut short so that the message stays one short line."""
    if isinstance(original, int) and not isinstance(original, bool) and abs(original) > 10**MAX_DIGITS:
        return f"a number of more than {MAX_DIGITS} digits"  # repr() of a huge int may even raise
    if not isinstance(original, str) or len(original) <= MAX_DIGITS:
        return repr(original)
    return f"{original[:MAX_DIGITS]!r}... ({len(original)} characters)"


def _bounded(value: int, what: str, original: object) -> int:
    if value > MAX:
        unit = {"duration": " seconds", "size": " bytes"}.get(what, "")
        raise QuantityTooLarge(f"{what} {shown(original)} is too large (at most {MAX}{unit})")
    return value


def _whole(text: str, what: str, original: object) -> int:
    """ASCII digits as an int, refusing a number too long to mean anything."""
    if len(text) > MAX_DIGITS:
        raise QuantityTooLarge(f"{what} {shown(original)}: a number of more than {MAX_DIGITS} digits")
    return int(text)


def parse_count(text: str, what: str = "cores") -> int:
    """A whole number of at least 1 written in ASCII digits (``'4'``), e.g. a job's cores."""
    if not isinstance(text, str) or not text or not set(text) <= _DIGITS or _whole(text, what, text) < 1:
        raise QuantityError(f"{what} {shown(text)}: expected a whole number of at least 1")
    return _bounded(int(text), what, text)


def _parse_decimal(text: str, multiplier: int, what: str, original: str) -> int:
    """``'1.5'`` × multiplier, exactly, or an error if it is not a whole number."""
    whole, dot, frac = text.partition(".")
    if not whole and not frac or not set(whole + frac) <= _DIGITS or (dot and not frac):
        raise QuantityError(f"{what} {shown(original)}: {shown(text)} is not a number")
    if len(text) > MAX_DIGITS:
        raise QuantityTooLarge(f"{what} {shown(original)}: a number of more than {MAX_DIGITS} digits")
    numerator = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
    value, remainder = divmod(numerator * multiplier, 10 ** len(frac))
    if remainder:
        raise QuantityError(f"{what} {shown(original)} is not a whole number of {_unit_name(what)}")
    return value


def _unit_name(what: str) -> str:
    return "seconds" if what == "duration" else "bytes"


class Duration(int):
    """A non-negative number of seconds; ``str()`` gives the shortest exact spelling."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: object) -> "Duration":
        if isinstance(value, bool):
            raise QuantityError(f"duration {shown(value)}: expected e.g. 90m, 10h, 2d or HH:MM:SS")
        if isinstance(value, int):
            if value < 0:
                raise QuantityError(f"duration {shown(value)} is negative")
            return cls(_bounded(value, "duration", value))
        if not isinstance(value, str):
            raise QuantityError(f"duration {shown(value)}: expected e.g. 90m, 10h, 2d or HH:MM:SS")
        text = value.strip().lower()
        if not text:
            raise QuantityError("duration '': expected e.g. 90m, 10h, 2d or HH:MM:SS")
        if ":" in text:
            seconds = _parse_clock(text, value)
        elif set(text) <= _DIGITS:
            seconds = _whole(text, "duration", value)
        else:
            seconds = _parse_compound(text, value)
        return cls(_bounded(seconds, "duration", value))

    def __str__(self) -> str:
        seconds = int(self)
        if seconds == 0:
            return "0s"
        for unit in ("w", "d", "h", "m"):
            if seconds % _DURATION_UNITS[unit] == 0:
                return f"{seconds // _DURATION_UNITS[unit]}{unit}"
        return f"{seconds}s"

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"

    def clock(self) -> str:
        """``HH:MM:SS`` as PBS and Slurm print it (hours may exceed 24)."""
        minutes, seconds = divmod(int(self), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def _parse_clock(text: str, original: str) -> int:
    fields = text.split(":")
    if len(fields) > 3 or not all(f and set(f) <= _DIGITS for f in fields):
        raise QuantityError(f"duration {shown(original)}: expected [[HH:]MM:]SS")
    total = 0
    for field in fields:
        total = total * 60 + _whole(field, "duration", original)
    return total


def _parse_compound(text: str, original: str) -> int:
    """``1h30m`` → 5400: a sequence of number+unit, each unit at most once, largest first."""
    total, number, seen = 0, "", []
    for char in text:
        if char in _DIGITS or char == ".":
            number += char
            continue
        if char not in _DURATION_UNITS or not number:
            raise QuantityError(
                f"duration {shown(original)}: expected e.g. 90m, 10h, 2d, 1h30m or HH:MM:SS"
            )
        if seen and _DURATION_UNITS[seen[-1]] <= _DURATION_UNITS[char]:
            raise QuantityError(f"duration {shown(original)}: units must go from largest to smallest")
        seen.append(char)
        total += _parse_decimal(number, _DURATION_UNITS[char], "duration", original)
        number = ""
    if number:
        raise QuantityError(f"duration {shown(original)}: {shown(number)} has no unit (s, m, h, d or w)")
    return total


class Size(int):
    """A non-negative number of bytes; ``str()`` gives the largest exact binary unit."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: object) -> "Size":
        if isinstance(value, bool):
            raise QuantityError(f"size {shown(value)}: expected e.g. 512MiB, 2GiB or 2G")
        if isinstance(value, int):
            if value < 0:
                raise QuantityError(f"size {shown(value)} is negative")
            return cls(_bounded(value, "size", value))
        if not isinstance(value, str):
            raise QuantityError(f"size {shown(value)}: expected e.g. 512MiB, 2GiB or 2G")
        text = value.strip()
        end = len(text)
        while end and not (text[end - 1] in _DIGITS or text[end - 1] == "."):
            end -= 1
        number, unit = text[:end].strip(), text[end:].strip().lower()
        if unit not in _SIZE_UNITS and unit != "":
            raise QuantityError(
                f"size {shown(value)}: unknown unit {shown(text[end:].strip())} "
                "(use KiB, MiB, GiB, TiB; K, M, G, T; kB, MB, GB, TB; or B)"
            )
        return cls(_bounded(_parse_decimal(number, _SIZE_UNITS.get(unit, 1), "size", value), "size", value))

    def __str__(self) -> str:
        size = int(self)
        if size == 0:
            return "0B"
        for exponent, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
            if size % 1024**exponent == 0:
                return f"{size // 1024**exponent}{unit}"
        return f"{size}B"

    def __repr__(self) -> str:
        return f"Size({str(self)!r})"

    @property
    def mib(self) -> int:
        """Whole MiB, rounded up (what a hypervisor is given)."""
        return -(-int(self) // 1024**2)
