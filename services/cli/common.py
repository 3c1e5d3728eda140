"""What the three command-line tools share: output formats, errors, connections."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import grpc
import typer
import yaml
from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


class Format(str, Enum):
    text = "text"
    json = "json"
    yaml = "yaml"


def cachegate_home() -> Path:
    return Path(os.environ.get("CACHEGATE_HOME") or Path.home() / ".cachegate")


def dev_dir() -> Path:
    return cachegate_home() / "dev"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def fail(message: str) -> None:
    raise CLIError(message)


def duration_flag(value: str | None, flag: str = "--ttl") -> float:
    """Seconds from a flag like --ttl=8h (0 when not given); a bad value is a one-line error."""
    if not value:
        return 0.0
    from services.common.durations import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise CLIError(f"{flag}: {exc}") from None


def fmt_time(when) -> str:
    """A time as the CLIs print it (UTC), from a datetime, epoch seconds or a protobuf
    Timestamp; "never" when there is none."""
    import datetime as dt

    from google.protobuf import timestamp_pb2

    if isinstance(when, timestamp_pb2.Timestamp):
        when = when.seconds + when.nanos / 1e9 if (when.seconds or when.nanos) else None
    if not when:
        return "never"
    if not isinstance(when, dt.datetime):
        when = dt.datetime.fromtimestamp(when, dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


async def rpc(method, request, target: str, what: str, timeout: float = 30):
    """Call a gRPC method; a failure becomes one CLIError line naming the server."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise CLIError(grpc_message(exc, target, what)) from None


def grpc_message(exc: grpc.aio.AioRpcError, target: str, what: str) -> str:
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        from services.common.grpcutil import AUTH_UNREACHABLE

        if details.startswith(AUTH_UNREACHABLE):
            return (f"the {what} at {target} answered, but it cannot reach the auth service right now: try again "
                    "shortly; if it persists, the cluster's administrator should check auth (`cgctl status`)")
        if "certificate" in details.lower() or "handshake" in details.lower() or "ssl" in details.lower():
            return (f"TLS with the {what} at {target} failed ({details.splitlines()[0]}): "
                    "your certificate may have expired or be from another cluster; log in again")
        return f"cannot reach the {what} at {target}: is it running? ({details.splitlines()[0]})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the {what} at {target} did not answer in time; check that it is running and reachable"
    return details.splitlines()[0]


def run(coro_fn: Callable) -> Callable:
    """Decorator: run an async command; print CLIError/gRPC errors as one line."""

    @wraps(coro_fn)
    def wrapper(*args, **kwargs):
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except CLIError as exc:
            err_console.print(f"ERROR: {exc}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def emit(data: Any, fmt: Format, text: Callable[[], None]) -> None:
    """Write ``data`` as JSON/YAML (only that, on stdout), or call ``text``."""
    if fmt == Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif fmt == Format.yaml:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        text()


def terminal_width() -> int | None:
    """Columns of the terminal stdout goes to ($COLUMNS wins); None when it is a pipe or a
    file, whose reader wants whole lines."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


ELLIPSIS = "..."
MIN_TRUNCATED = 10


def table(columns: list[str], rows: list[list[str]], truncate: str | None = None, width: int | None = None) -> None:
    """A plain table in the reference style: header, dashes, rows; never wrapped. With
    ``truncate`` (a column name) and ``width``, that column's cells are cut, ending in "...",
    so that each line fits in ``width`` (the column keeps at least 10 characters)."""
    rows = [[str(x) for x in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    if truncate in columns and width:
        i = columns.index(truncate)
        room = width - (sum(widths) + len(widths) - 1 - widths[i])
        keep = max(room, MIN_TRUNCATED, len(truncate))
        if keep < widths[i]:
            for r in rows:
                if len(r[i]) > keep:
                    r[i] = r[i][: keep - len(ELLIPSIS)] + ELLIPSIS
            widths[i] = keep

    def line(cells):
        return " ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]
    sys.stdout.write("\n".join(out) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
