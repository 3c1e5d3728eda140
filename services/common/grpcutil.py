"""Small helpers shared by the servicers: timestamps, durations, paging."""

from __future__ import annotations

import base64
import datetime as dt

from google.protobuf import duration_pb2, timestamp_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# What dbproxy answers (UNAVAILABLE) when it cannot reach auth for a call it forwards; the
# CLIs tell it apart from the proxy itself being unreachable by this text.
AUTH_UNREACHABLE = "the auth service is not reachable from the proxy right now"


def ts(when: dt.datetime | float | None) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    if when is None:
        return out
    if isinstance(when, (int, float)):
        out.FromNanoseconds(int(when * 1e9))
    else:
        out.FromDatetime(when.astimezone(dt.timezone.utc).replace(tzinfo=None))
    return out


def from_ts(t: timestamp_pb2.Timestamp) -> float | None:
    if t is None or (t.seconds == 0 and t.nanos == 0):
        return None
    return t.seconds + t.nanos / 1e9


def dur(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def from_dur(d: duration_pb2.Duration | None) -> float:
    if d is None:
        return 0.0
    return d.seconds + d.nanos / 1e9


def page_size(requested: int) -> int:
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode() if last_key else ""


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except Exception:
        raise ValueError("invalid page_token: pass the next_page_token of the previous page") from None


def paginate(items: list, key, size: int, token: str) -> tuple[list, str]:
    """Page a sorted list by key: (page, next_page_token)."""
    after = decode_page_token(token)
    items = [i for i in items if key(i) > after] if after else items
    n = page_size(size)
    page = items[:n]
    nxt = encode_page_token(key(page[-1])) if len(items) > n else ""
    return page, nxt
