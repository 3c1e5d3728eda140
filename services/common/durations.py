"""Durations and sizes as people write them in config, roles and flags: 30s, 15m, 8h, 1h30m,
2d, 500ms; 64MiB, 512KiB, 1048576."""

from __future__ import annotations

import math
import re
from typing import Any

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


_MiB = 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": _MiB, "mb": _MiB, "mib": _MiB,
          "g": 1024 * _MiB, "gb": 1024 * _MiB, "gib": 1024 * _MiB}


def parse_size(value: Any) -> int:
    """``"64MiB"`` -> 67108864; ints pass through. ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: it must be positive")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"invalid size {value!r}: use a number of bytes or KiB/MiB/GiB, like 64MiB")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
