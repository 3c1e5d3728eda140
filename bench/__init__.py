"""Benchmarks: `python -m bench` (see bench/README.md and docs/performance.md)."""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "protos"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
