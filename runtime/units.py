"""Byte sizes: parse user input such as ``"24GiB"`` and format byte counts for people.

Binary and decimal units are both accepted, with the usual meanings:

* ``KiB``, ``MiB``, ``GiB``, ``TiB`` (and the bare ``K``, ``M``, ``G``, ``T`` used by
  nvidia-smi) are powers of 1024;
* ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000;
* ``B`` or no unit means bytes.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_size", "fmt_bytes"]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": TiB,
    "tib": TiB,
    "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)$")


def _bad(name: str, value: object, why: str) -> ValueError:
    return ValueError(
        f"{name}={value!r} is not a valid size ({why}); "
        'use bytes as a number or a string such as "24GiB", "512MiB" or "24GB"'
    )


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Return a size in bytes from a number or a string with a unit.

    Args:
        value: bytes as an ``int`` / ``float``, or a string such as ``"24GiB"``,
            ``"24 GiB"``, ``"1.5GiB"``, ``"24GB"`` (10^9), ``"512MiB"``, ``"100KB"``,
            ``"24G"`` (GiB, as nvidia-smi), ``"123"``. Units are case-insensitive.
        name: the parameter name, used in the error message.

    Returns:
        The size in bytes (rounded down to a whole byte).

    Raises:
        ValueError: for a negative, empty, NaN/infinite or unparseable value, an unknown
            unit, or a ``bool``. The message names ``name`` and the bad value.
    """
    if isinstance(value, bool):
        raise _bad(name, value, "a bool is not a size")
    if isinstance(value, int):
        if value < 0:
            raise _bad(name, value, "negative")
        return value
    if isinstance(value, float):
        return _from_number(value, 1, name, value)
    if not isinstance(value, str):
        raise _bad(name, value, f"unsupported type {type(value).__name__}")
    text = value.strip().lower()
    if not text:
        raise _bad(name, value, "empty")
    if text.startswith("-"):
        raise _bad(name, value, "negative")
    match = _SIZE_RE.match(text)
    if match is None:
        raise _bad(name, value, "cannot parse it")
    unit = match.group("unit")
    if unit not in _UNITS:
        raise _bad(name, value, f"unknown unit {unit!r}")
    return _from_number(float(match.group("num")), _UNITS[unit], name, value)


def _from_number(number: float, scale: int, name: str, original: object) -> int:
    if math.isnan(number) or math.isinf(number):
        raise _bad(name, original, "not a finite number")
    if number < 0:
        raise _bad(name, original, "negative")
    return int(number * scale)


def fmt_bytes(n: int | float) -> str:
    """Format a byte count for people: ``"17 B"``, ``"4.0 KiB"``, ``"512.0 MiB"``, ``"1.50 GiB"``.

    Args:
        n: number of bytes (may be negative, e.g. for a shortfall).

    Returns:
        The count in the largest binary unit that keeps it >= 1; GiB and TiB get two
        decimals, KiB and MiB one, bytes none.
    """
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < KiB:
        return f"{sign}{int(n)} B"
    if n < MiB:
        return f"{sign}{n / KiB:.1f} KiB"
    if n < GiB:
        return f"{sign}{n / MiB:.1f} MiB"
    if n < TiB:
        return f"{sign}{n / GiB:.2f} GiB"
    return f"{sign}{n / TiB:.2f} TiB"
