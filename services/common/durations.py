"""Durations as people write them in config, roles and flags: 30s, 15m, 8h, 1h30m, 2d, 500ms."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_HINT = "use a number and a unit, like 30s, 15m, 8h, 1h30m or 2d"


def parse_duration(value: str | int | float) -> float:
    """Parse ``"30s"``, ``"15m"``, ``"8h"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` into seconds.

    Numbers (and strings that are just a number) are seconds. Raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"invalid duration {value!r}: it must be zero or positive")
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    text = re.sub(r"\s+", "", value).lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    return total


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` (to the millisecond): 5400 -> ``"1h30m"``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}")
    ms_total = round(seconds * 1000)
    if ms_total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms_total = divmod(ms_total, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
