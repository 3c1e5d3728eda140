"""Database resources for cgctl: `create -f db.yaml`, `get dbs`, `rm db/NAME`, fetcher status.

A database document::

    kind: db
    version: v1
    metadata:
      name: orders-cache
      description: Orders cache (on-premises)
      labels: {env: prod}
    spec:
      protocol: redis               # the only one
      uri: redis.internal:6380      # host:port
      tls: true                     # default true
      ca_cert_file: /etc/ssl/redis-ca.pem   # or ca_cert: <PEM>; default: system CAs
      secret: env:CACHEGATE_DB_ORDERS_CACHE # where dbproxy reads the password (optional)

cgctl.py wires these in; nothing here talks to the network.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from cachegate.types.v1 import types_pb2
from services.cli.common import fmt_time, table
from services.common.pki import holds_certificate, read_ca_file
from services.common.durations import format_duration
from services.common.grpcutil import from_ts

KINDS = ("db", "database")
VERSIONS = ("v1", "v3")
ORIGINS = {
    types_pb2.DATABASE_ORIGIN_CONFIG: "config",
    types_pb2.DATABASE_ORIGIN_DYNAMIC: "dynamic",
    types_pb2.DATABASE_ORIGIN_DISCOVERY: "discovery",
}


class DbDocumentError(ValueError):
    """A db.yaml problem; the message names the field."""


def is_db_document(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("kind", "")).lower() in KINDS


def db_from_yaml(doc: dict, base_dir: Path | None = None) -> types_pb2.Database:
    """A ``kind: db`` document as a Database record (origin DYNAMIC, set by auth anyway)."""
    if not isinstance(doc, dict):
        raise DbDocumentError("a database document must be a YAML mapping")
    kind = str(doc.get("kind", "")).lower()
    if kind not in KINDS:
        raise DbDocumentError(f"kind must be db, not {doc.get('kind')!r}")
    version = str(doc.get("version", "v1"))
    if version not in VERSIONS:
        raise DbDocumentError(f"version must be v1, not {version!r}")
    unknown = set(doc) - {"kind", "version", "metadata", "spec"}
    if unknown:
        raise DbDocumentError(f"unknown field {sorted(unknown)[0]!r}: a db has kind, version, metadata and spec")
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise DbDocumentError("metadata and spec must be mappings")
    bad = set(meta) - {"name", "description", "labels"}
    if bad:
        raise DbDocumentError(f"unknown field metadata.{sorted(bad)[0]}: use name, description, labels")
    bad = set(spec) - {"protocol", "uri", "tls", "ca_cert", "ca_cert_file", "secret", "auth"}
    if bad:
        raise DbDocumentError(f"unknown field spec.{sorted(bad)[0]}: use protocol, uri, tls, ca_cert, "
                              "ca_cert_file, secret, auth")
    if str(spec.get("auth") or "").strip().lower() not in ("", "secret"):
        # The proxy's Entra ID token opens every cache its identity may use: it goes only to
        # addresses Azure or the proxy host's operator named, never to one in an admin record.
        raise DbDocumentError("spec.auth: entra is not accepted in an administrator's record (the proxy's token "
                              "would go to the address it names): tag the Azure cache cachegate-auth=entra, or set "
                              "auth: entra on the database in discovery_service.static of the host's config")
    name = str(meta.get("name") or "").strip()
    if not name:
        raise DbDocumentError("metadata.name is required")
    uri = str(spec.get("uri") or "").strip()
    if not uri:
        raise DbDocumentError("spec.uri is required (host:port)")
    protocol = str(spec.get("protocol") or "redis")
    if protocol != "redis":
        raise DbDocumentError(f"spec.protocol {protocol!r} is not supported: use redis")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise DbDocumentError("metadata.labels must be a mapping of name: value")
    tls_value = spec.get("tls", True)
    if isinstance(tls_value, dict):  # Teleport's shape: tls: {ca_cert: ...}
        spec = {**spec, "ca_cert": spec.get("ca_cert") or tls_value.get("ca_cert", "")}
        tls_value = tls_value.get("mode", "verify-full") != "insecure"
    if not isinstance(tls_value, bool):
        raise DbDocumentError("spec.tls must be true or false")
    ca = str(spec.get("ca_cert") or "")
    if spec.get("ca_cert_file"):
        try:
            _, ca = read_ca_file(str(spec["ca_cert_file"]), base_dir)
        except OSError as exc:
            raise DbDocumentError(f"spec.ca_cert_file: cannot read {exc.filename}: {exc.strerror}") from None
    if ca and not holds_certificate(ca):
        raise DbDocumentError("spec.ca_cert must be a PEM certificate bundle")
    secret = str(spec.get("secret") or "").strip()
    if secret and not (secret.startswith("env:") or secret.startswith("file:")):
        raise DbDocumentError("spec.secret must be env:NAME (a reference, never the password itself)")
    return types_pb2.Database(
        name=name, description=str(meta.get("description") or ""), protocol="redis", uri=uri,
        labels={str(k): str(v) for k, v in labels.items()}, origin=types_pb2.DATABASE_ORIGIN_DYNAMIC,
        ca_cert_pem=ca, secret_ref=secret, tls=tls_value)


def db_to_dict(db: types_pb2.Database) -> dict:
    """A record as shown by `cgctl get dbs --format json|yaml` (never a secret: only its reference)."""
    out: dict = {
        "kind": "db", "version": "v1",
        "metadata": {"name": db.name, "description": db.description, "labels": dict(sorted(db.labels.items()))},
        "spec": {"protocol": db.protocol or "redis", "uri": db.uri, "tls": db.tls},
        "status": {"origin": ORIGINS.get(db.origin, "unspecified")},
    }
    if db.secret_ref:
        out["spec"]["secret"] = db.secret_ref
    if db.ca_cert_pem:
        out["spec"]["ca_cert"] = db.ca_cert_pem
    if db.owner:
        out["status"]["owner"] = db.owner
    if db.HasField("azure") and db.azure.resource_id:
        a = db.azure
        out["status"]["azure"] = {
            "resource_id": a.resource_id, "subscription_id": a.subscription_id, "resource_group": a.resource_group,
            "region": a.region, "kind": a.kind, "clustering_policy": a.clustering_policy,
            "access_key_auth_disabled": a.access_key_auth_disabled, "auth": a.auth or (
                "entra" if a.access_key_auth_disabled else "access_key")}
    if db.HasField("azure") and db.azure.auth and not db.azure.resource_id:
        out["spec"]["auth"] = db.azure.auth
    t = from_ts(db.update_time)
    if t:
        out["status"]["updated"] = fmt_time(t)
    return out


def _labels_text(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def print_dbs(dbs: Iterable[types_pb2.Database], fmt: str = "text", verbose: bool = False) -> None:
    """`cgctl get dbs`: a table (Name, Description, Origin, URI, Labels) or JSON/YAML documents."""
    dbs = sorted(dbs, key=lambda d: d.name)
    fmt = getattr(fmt, "value", fmt)
    if fmt == "json":
        sys.stdout.write(json.dumps([db_to_dict(d) for d in dbs], indent=2) + "\n")
        return
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump_all([db_to_dict(d) for d in dbs], sort_keys=False) if dbs else "")
        return
    columns = ["Name", "Description", "Origin", "Auth", "URI", "Labels"]
    rows = []
    for d in dbs:
        a = d.azure
        auth = a.auth or ("entra" if a.access_key_auth_disabled else "access_key" if a.resource_id else "") or (
            "secret" if d.secret_ref else "-")
        row = [d.name, d.description, ORIGINS.get(d.origin, "-"), auth, d.uri, _labels_text(dict(d.labels))]
        if verbose:
            row.append(d.azure.resource_id if d.HasField("azure") else "")
        rows.append(row)
    if verbose:
        columns.append("Azure Resource")
    table(columns, rows)


# A discovery host reports after every round: unheard of for three of its poll intervals
# (plus a round's own time) it is marked stale; this long when it did not say its interval.
# A dbproxy host: three of its heartbeat intervals.
DISCOVERY_STALE_AFTER = 300.0
ROUND_GRACE = 5.0
# A host unheard of for this long is left out of `cgctl status` (auth forgets it later).
DROP_AFTER = 3600.0
HEALTH_NAMES = {0: "unknown", 1: "ok", 2: "down"}


def _age(seconds: float) -> str:
    return format_duration(max(0.0, round(seconds))) + " ago"


def host_seen(h: Any) -> float:
    """When a discovery host last reported: auth's stamp, else its fetchers' latest time."""
    t = from_ts(h.report_time) if h.HasField("report_time") else 0.0
    if t:
        return t
    return max([from_ts(s.last_success_time) or 0.0 for s in h.statuses]
               + [from_ts(s.last_error_time) or 0.0 for s in h.statuses] + [0.0])


def live_hosts(hosts: Iterable[Any], seen, now: float | None = None) -> tuple[list, int]:
    """(hosts heard of within DROP_AFTER, how many older ones were left out)."""
    now = time.time() if now is None else now
    keep, dropped = [], 0
    for h in hosts:
        t = seen(h)
        if t and now - t > DROP_AFTER:
            dropped += 1
        else:
            keep.append(h)
    return keep, dropped


def health_to_dict(h: Any) -> dict:
    return {"database": h.name, "state": HEALTH_NAMES.get(h.state, "unknown"),
            "last_success": fmt_time(h.last_success_time), "last_failure": fmt_time(h.last_failure_time),
            "last_error": h.last_error, "last_error_kind": h.last_error_kind, "successes": h.successes,
            "connect_failures": h.connect_failures, "timeouts": h.timeouts, "auth_failures": h.auth_failures,
            "consecutive_failures": h.consecutive_failures}


def proxy_statuses_to_list(proxies: Iterable[Any], now: float | None = None) -> list[dict]:
    now = time.time() if now is None else now
    out = []
    for p in proxies:
        seen = from_ts(p.heartbeat_time) or 0.0
        interval = p.heartbeat_interval_seconds or 10
        out.append({"host": p.host_id, "version": p.version, "last_heartbeat": fmt_time(p.heartbeat_time),
                    "seen_seconds_ago": round(now - seen, 1) if seen else None,
                    "stale": not seen or now - seen > 3 * interval, "sessions": p.sessions,
                    "databases": [health_to_dict(h) for h in p.databases]})
    return out


def print_proxy_statuses(proxies: Iterable[Any], dropped: int = 0, now: float | None = None) -> None:
    """The dbproxy part of `cgctl status`: each host's last heartbeat, then database health."""
    data = proxy_statuses_to_list(proxies, now)
    if not data:
        sys.stdout.write("Proxies: no dbproxy host has reported yet\n")
    else:
        sys.stdout.write("Proxies\n")
        table(["Host", "Version", "Sessions", "Last Heartbeat", "Status"], [
            [d["host"], d["version"], str(d["sessions"]), d["last_heartbeat"],
             ("stale: not seen for " + format_duration(max(0, round(d["seen_seconds_ago"] or 0)))) if d["stale"]
             else f"ok ({_age(d['seen_seconds_ago'] or 0)})"] for d in data])
        rows = [[h["database"], d["host"], h["state"], h["last_success"],
                 str(h["connect_failures"] + h["timeouts"] + h["auth_failures"]),
                 (h["last_error"].splitlines() or [""])[0] if h["state"] == "down" else ""]
                for d in data for h in d["databases"]]
        if rows:
            sys.stdout.write("\nDatabase health (as each proxy sees it)\n")
            table(["Database", "Proxy", "Health", "Last Success", "Failures", "Last Error"], rows)
    if dropped:
        sys.stdout.write(f"({dropped} dbproxy host(s) not heard from for over {format_duration(DROP_AFTER)} "
                         "are not shown)\n")
    sys.stdout.write("\n")


def fetcher_statuses_to_list(hosts: Iterable[Any], now: float | None = None) -> list[dict]:
    """ListFetcherStatuses (auth's, per host) as plain dicts, for `cgctl status`."""
    now = time.time() if now is None else now
    out = []
    for h in hosts:
        seen = host_seen(h)
        for s in h.statuses:
            out.append({
                "host": h.host_id, "fetcher": s.name, "kind": s.kind, "last_report": fmt_time(seen or None),
                "stale": bool(seen) and now - seen > (3 * h.poll_interval_seconds + ROUND_GRACE
                                                      if h.poll_interval_seconds else DISCOVERY_STALE_AFTER),
                "last_success": fmt_time(s.last_success_time),
                "last_error": s.last_error, "last_error_time": fmt_time(s.last_error_time) if s.last_error else "",
                "databases_found": s.databases_found, "unpublished": list(s.unpublished)})
    return out


def print_fetcher_statuses(hosts: Iterable[Any], fmt: str = "text") -> None:
    """The discovery part of `cgctl status`: per fetcher, last success, last error, databases."""
    data = fetcher_statuses_to_list(hosts)
    fmt = getattr(fmt, "value", fmt)
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
        return
    if not data:
        sys.stdout.write("Discovery: no discovery host has reported yet\n")
        return
    sys.stdout.write("Discovery\n")
    table(["Host", "Fetcher", "Databases", "Unpublished", "Last Success", "Last Report", "Last Error"], [
        [d["host"], d["fetcher"], str(d["databases_found"]), str(len(d.get("unpublished", []))), d["last_success"],
         d["last_report"] + (" (stale)" if d["stale"] else ""), (d["last_error"].splitlines() or [""])[0]]
        for d in data])
    # Resources discovery found and could not publish (an invalid or clashing name tag).
    unpublished = sorted({(d["fetcher"], d["host"], line) for d in data for line in d.get("unpublished", [])})
    if unpublished:
        sys.stdout.write(f"\nNot published ({len(unpublished)}):\n")
        for fetcher, host, line in unpublished:
            sys.stdout.write(f"  {line} [{fetcher} on {host}]\n")
    # The full message (DefaultAzureCredential's lines, what to check) once per distinct error.
    seen = set()
    for d in data:
        if d["last_error"] and d["last_error"] not in seen:
            seen.add(d["last_error"])
            sys.stdout.write(f"\n{d['fetcher']} ({d['host']}), {d['last_error_time']}:\n  "
                             + "\n  ".join(d["last_error"].splitlines()) + "\n")
