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
from pathlib import Path
from typing import Any, Iterable

import yaml

from cachegate.types.v1 import types_pb2
from services.cli.common import fmt_time, table
from services.common.pki import holds_certificate, read_ca_file
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


def fetcher_statuses_to_list(hosts: Iterable[Any]) -> list[dict]:
    """ListFetcherStatuses (auth's, per host) as plain dicts, for `cgctl status`."""
    out = []
    for h in hosts:
        for s in h.statuses:
            out.append({
                "host": h.host_id, "fetcher": s.name, "kind": s.kind,
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
    table(["Host", "Fetcher", "Databases", "Unpublished", "Last Success", "Last Error"], [
        [d["host"], d["fetcher"], str(d["databases_found"]), str(len(d.get("unpublished", []))), d["last_success"],
         (d["last_error"].splitlines() or [""])[0]] for d in data])
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
