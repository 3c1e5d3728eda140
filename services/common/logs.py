"""Structured logs: one JSON object per line (or plain text), on stderr by default.

Every line a daemon writes is a log record: :func:`setup_logging` points file descriptor 2
at a pipe that a thread reads, so what the gRPC C-core (``E1201 ... chttp2_transport.cc``)
or anything else writes to stderr becomes a record of logger ``grpc.core`` (or ``stderr``)
with its level. A record made while an OpenTelemetry span is current carries ``trace_id``
and ``span_id``, the ids the exported spans carry.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _span_ids() -> dict:
    """trace_id/span_id of the current span (hex, as exporters print them), if any."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class SpanIdFilter(logging.Filter):
    """Adds the current span's ids to the record (in the thread that logs, where the span is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            for k, v in _span_ids().items():
                setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Type and message only: tracebacks can carry request data.
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__(f"%(asctime)s %(levelname)-7s [{service}] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


# Audit events that also get one info line in the service log (to tie to a trace).
LOGGED_EVENTS = {"user.login": "login", "user.cert.database": "database certificate",
                 "db.session.start": "session start", "db.session.end": "session end", "join": "host joined"}
_event_log = logging.getLogger("cachegate.events")


def event_line(type_: str, actor: str, source_addr: str = "", success: bool = True, error: str = "",
               fields: dict | None = None) -> None:
    """One info (warning when it failed) line for an audited login, certificate or session;
    audit fields carry no credential (commands are redacted before they get here)."""
    what = LOGGED_EVENTS.get(type_)
    if what is None or not _event_log.isEnabledFor(logging.INFO):
        return
    extra = {"event": type_, "user": actor, "source_addr": source_addr, "success": success}
    if error:
        extra["error"] = error
    for k, v in (fields or {}).items():
        if v is not None and k not in _RESERVED and k not in extra:
            extra[k] = v
    _event_log.log(logging.INFO if success else logging.WARNING,
                   f"{what} {'ok' if success else 'failed'}: {actor or '-'}", extra=extra)


# absl/glog lines of the gRPC C-core: "E1201 12:00:00.123456  4242 chttp2_transport.cc:1234] text"
_CORE_LINE = re.compile(r"^([DIWEF])\d{4} [\d:.]+\s+\d+ ([^\s:\]]+):(\d+)\] ?(.*)$")
_CORE_LEVEL = {"D": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def stderr_record(line: str) -> logging.LogRecord:
    """A log record for one line written to stderr by someone other than logging."""
    m = _CORE_LINE.match(line)
    if m:
        rec = logging.makeLogRecord({"name": "grpc.core", "levelno": _CORE_LEVEL[m.group(1)],
                                     "levelname": logging.getLevelName(_CORE_LEVEL[m.group(1)]),
                                     "msg": m.group(4), "source": f"{m.group(2)}:{m.group(3)}"})
    else:
        rec = logging.makeLogRecord({"name": "stderr", "levelno": logging.WARNING, "levelname": "WARNING",
                                     "msg": line})
    return rec


class _StderrRouter:
    """fd 2 -> pipe -> this thread -> the log handler (which writes to the real stderr)."""

    def __init__(self, handler: logging.Handler):
        self.handler = handler
        self.real = os.dup(2)
        r, w = os.pipe()
        sys.stderr.flush()
        os.dup2(w, 2)
        os.close(w)
        self.reader = os.fdopen(r, "rb", buffering=0)
        self.thread = threading.Thread(target=self._pump, name="stderr-router", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.reader.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._emit(raw)
        if buf:
            self._emit(buf)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if not line.strip():
            return
        rec = stderr_record(line)
        if rec.levelno >= self.handler.level and rec.levelno >= logging.getLogger(rec.name).getEffectiveLevel():
            self.handler.handle(rec)

    def close(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 2)  # the pipe's last writer closes: the thread reads to the end
        self.thread.join(timeout=2)


_router: list[_StderrRouter] = []


def stop_stderr_routing() -> None:
    """Give fd 2 back to the real stderr (what the router held is logged first)."""
    while _router:
        _router.pop().close()


def setup_logging(service: str, level: str = "info", fmt: str = "json", output: str = "",
                  route_stderr: bool = False) -> None:
    """Log records to ``output`` (or stderr). ``route_stderr`` (daemons): what others write to
    stderr, the gRPC C-core included, becomes records too."""
    handler: logging.Handler
    if output:
        handler = logging.FileHandler(output)
    elif route_stderr:
        handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.addFilter(SpanIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (Azure SDK request logs carry headers) stays at warning.
    for noisy in ("azure", "urllib3", "aiohttp.access", "msal", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # What the C-core prints is what GRPC_VERBOSITY / GRPC_TRACE asked for.
    logging.getLogger("grpc.core").setLevel(root.level)
    if route_stderr and not _router:
        _router.append(_StderrRouter(handler))
