"""The wire form of an audit batch (``EmitAuditEventsRequest``), read without protobuf.

A batch is its events one after the other, each as field 1 (``events``): the tag byte
0x0A, a varint length, the serialized ``AuditEvent``. dbproxy writes batches in this
form itself and keeps them in its spool files; auth stores each event's bytes as they
came (after checking the parsed event), instead of serializing every event again.
"""

from __future__ import annotations

__all__ = ["event_spans"]


def event_spans(data: bytes, name: str = "") -> list[tuple[int, int, int]]:
    """Where each event is in a serialized EmitAuditEventsRequest: (the start of its field,
    the start of its own bytes, their end). ValueError when ``data`` holds anything else
    (another field, a cut-off event)."""
    out = []
    append = out.append
    off, n = 0, len(data)
    while off < n:
        if data[off] != 0x0A:
            raise ValueError(f"not an audit batch {name}".strip())
        p = off + 1
        ln = shift = 0
        # Nearly every event is shorter than 16 KiB: a length of one or two bytes.
        if p + 1 < n:
            b = data[p]
            if b < 0x80:
                ln, p, shift = b, p + 1, -1
            else:
                b2 = data[p + 1]
                if b2 < 0x80:
                    ln, p, shift = (b & 0x7F) | b2 << 7, p + 2, -1
        while shift >= 0:
            if p >= n or shift > 28:
                raise ValueError(f"truncated audit batch {name}".strip())
            b = data[p]
            p += 1
            ln |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        end = p + ln
        if end > n:
            raise ValueError(f"truncated audit batch {name}".strip())
        append((off, p, end))
        off = end
    return out
