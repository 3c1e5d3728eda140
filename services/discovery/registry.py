"""Publishing to auth's database registry: record conversions and the Registry over gRPC.

Discovery owns only what it publishes: Azure records carry the owner ``azure/<group>``,
static ones ``static/<group>``, and every list, update and delete is limited to that owner,
so static-config records and administrators' records are never touched by the reconciler.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
from cachegate.auth.v1 import database_service_pb2
from cachegate.types.v1 import types_pb2

from services.common.grpcutil import ts
from services.common.pki import holds_certificate, read_ca_file

from .azure import AzureInfo, DiscoveredDatabase
from .reconciler import FetcherStatus

log = logging.getLogger("cachegate.discovery.registry")

RPC_TIMEOUT = 15.0
ORIGINAL_NAME_LABEL = "original-name"


def azure_owner(group: str) -> str:
    return f"azure/{group or 'default'}"


def static_owner(group: str) -> str:
    return f"static/{group or 'default'}"


def to_proto(record: DiscoveredDatabase, owner: str) -> types_pb2.Database:
    a = record.azure
    return types_pb2.Database(
        name=record.name, description=record.description, protocol=record.protocol or "redis", uri=record.uri,
        labels=dict(record.labels), origin=types_pb2.DATABASE_ORIGIN_DISCOVERY, owner=owner, tls=True,
        azure=types_pb2.AzureDatabase(
            resource_id=a.resource_id, subscription_id=a.subscription_id, resource_group=a.resource_group,
            region=a.region, kind=a.kind, clustering_policy=a.clustering_policy or "",
            access_key_auth_disabled=a.access_key_auth_disabled, auth=a.auth))


def from_proto(db: types_pb2.Database) -> DiscoveredDatabase:
    a = db.azure
    labels = dict(db.labels)
    return DiscoveredDatabase(
        name=db.name, description=db.description, uri=db.uri, labels=labels, protocol=db.protocol or "redis",
        original_name=labels.get(ORIGINAL_NAME_LABEL) or db.name,
        azure=AzureInfo(resource_id=a.resource_id, subscription_id=a.subscription_id,
                        resource_group=a.resource_group, region=a.region, kind=a.kind,
                        clustering_policy=a.clustering_policy or None,
                        access_key_auth_disabled=a.access_key_auth_disabled, auth=a.auth))


async def list_by_owner(stub, owner: str) -> list[types_pb2.Database]:
    out: list[types_pb2.Database] = []
    token = ""
    for _ in range(100000):
        resp = await stub.ListDatabases(database_service_pb2.ListDatabasesRequest(
            owner=owner, page_size=500, page_token=token), timeout=RPC_TIMEOUT)
        out.extend(resp.databases)
        token = resp.next_page_token
        if not token:
            break
    return out


def _rpc_error(exc: grpc.aio.AioRpcError, what: str) -> RuntimeError:
    details = (exc.details() or exc.code().name).splitlines()[0]
    return RuntimeError(f"auth refused {what}: {details}")


class AuthRegistry:
    """The reconciler's Registry, over auth's DatabaseService (``AuthClient.databases``)."""

    def __init__(self, stub, owner: str):
        self.stub = stub
        self.owner = owner

    async def list_owned(self) -> list[DiscoveredDatabase]:
        try:
            return [from_proto(db) for db in await list_by_owner(self.stub, self.owner)]
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, "listing databases") from None

    async def upsert(self, record: DiscoveredDatabase) -> None:
        try:
            await self.stub.UpsertDatabase(database_service_pb2.UpsertDatabaseRequest(
                database=to_proto(record, self.owner)), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, f"publishing {record.name}") from None

    async def delete(self, name: str) -> None:
        try:
            await self.stub.DeleteDatabase(database_service_pb2.DeleteDatabaseRequest(name=name),
                                           timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise _rpc_error(exc, f"deleting {name}") from None


# --- static databases ----------------------------------------------------------------------
class StaticDatabaseError(ValueError):
    pass


def static_record(entry: Any, owner: str, base_dir: Path | None = None) -> types_pb2.Database:
    """A ``discovery_service.static`` entry as a registry record. The CA file is read here
    (its PEM goes in the record); the secret stays a reference (env:NAME or file:/path) that
    dbproxy resolves, and is never read by discovery."""
    ca_pem = ""
    if entry.ca_file:
        try:
            path, ca_pem = read_ca_file(entry.ca_file, base_dir)
        except OSError as exc:
            raise StaticDatabaseError(f"static database {entry.name}: cannot read ca_file {exc.filename}: "
                                      f"{exc.strerror}") from None
        if not holds_certificate(ca_pem):
            raise StaticDatabaseError(f"static database {entry.name}: ca_file {path} holds no PEM certificate")
    secret = entry.secret.strip()
    if secret and not (secret.startswith("env:") and len(secret) > 4 or secret.startswith("file:") and len(secret) > 5):
        # Never echo the value: it may be the password itself.
        raise StaticDatabaseError(f"static database {entry.name}: secret must be env:NAME or file:/path "
                                  "(a reference, not the password itself)")
    auth = (getattr(entry, "auth", "") or "").strip().lower().replace("-", "_")
    if auth not in ("", "secret", "entra"):
        raise StaticDatabaseError(f"static database {entry.name}: auth must be entra or secret, not {auth!r}")
    if auth == "entra" and secret:
        raise StaticDatabaseError(f"static database {entry.name}: auth: entra needs no secret; remove one of them")
    if auth == "entra" and not entry.tls:
        raise StaticDatabaseError(f"static database {entry.name}: Entra ID tokens are sent over TLS only; "
                                  "set tls: true")
    labels = {"cloud": "static", **entry.labels}
    if auth == "entra":
        labels["auth"] = "entra"
    cluster = bool(getattr(entry, "cluster", False))
    if cluster:
        labels["clustering-policy"] = "OSSCluster"
    azure = None
    if auth == "entra" or cluster:
        azure = types_pb2.AzureDatabase(auth="entra" if auth == "entra" else "",
                                        clustering_policy="OSSCluster" if cluster else "")
    return types_pb2.Database(
        name=entry.name, description=entry.description or f"Redis server at {entry.uri}", protocol="redis",
        uri=entry.uri, labels=labels, origin=types_pb2.DATABASE_ORIGIN_CONFIG, ca_cert_pem=ca_pem,
        secret_ref=secret, owner=owner, tls=entry.tls, azure=azure)


def _same(a: types_pb2.Database, b: types_pb2.Database) -> bool:
    a2, b2 = types_pb2.Database(), types_pb2.Database()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.ClearField("update_time")
    b2.ClearField("update_time")
    return a2.SerializeToString(deterministic=True) == b2.SerializeToString(deterministic=True)


class StaticPublisher:
    """Publishes the config's static databases and removes the ones taken out of it."""

    name = "static"

    def __init__(self, stub, entries: list, owner: str, base_dir: Path | None = None):
        self.stub = stub
        self.entries = list(entries)
        self.owner = owner
        self.base_dir = base_dir
        self.status = FetcherStatus(name="static", kind="static")
        # What the last round changed: (records published, records deleted).
        self.last_changes = (0, 0)

    async def run_once(self) -> None:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        self.status.last_attempt = now
        errors: list[str] = []
        changes = [0, 0]
        self.last_changes = (0, 0)
        wanted: dict[str, types_pb2.Database] = {}
        for e in self.entries:
            try:
                wanted[e.name] = static_record(e, self.owner, self.base_dir)
            except StaticDatabaseError as exc:
                errors.append(str(exc))
        try:
            current = {db.name: db for db in await list_by_owner(self.stub, self.owner)}
            for name, db in sorted(wanted.items()):
                if name in current and _same(current[name], db):
                    continue
                try:
                    await self.stub.UpsertDatabase(database_service_pb2.UpsertDatabaseRequest(database=db),
                                                   timeout=RPC_TIMEOUT)
                    log.info("static database published", extra={"db": name})
                    changes[0] += 1
                except grpc.aio.AioRpcError as exc:
                    errors.append(str(_rpc_error(exc, f"publishing {name}")))
            for name in sorted(set(current) - set(wanted)):
                bad = [e for e in self.entries if e.name == name]
                if bad:  # in the config but unreadable this time: keep the published record
                    continue
                try:
                    await self.stub.DeleteDatabase(database_service_pb2.DeleteDatabaseRequest(name=name),
                                                   timeout=RPC_TIMEOUT)
                    log.info("static database removed", extra={"db": name})
                    changes[1] += 1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        errors.append(str(_rpc_error(exc, f"deleting {name}")))
        except grpc.aio.AioRpcError as exc:
            errors.append(str(_rpc_error(exc, "listing databases")))
        self.status.databases_found = len(wanted)
        self.last_changes = (changes[0], changes[1])
        if errors:
            for err in errors:
                log.error("discovery: %s", err)
            self.status.last_error = "; ".join(errors)
            self.status.last_error_detail = self.status.last_error
            self.status.last_error_time = now
            self.status.consecutive_failures += 1
        else:
            self.status.last_error = None
            self.status.last_success = now
            self.status.consecutive_failures = 0


def status_proto(st: FetcherStatus) -> types_pb2.FetcherStatus:
    out = types_pb2.FetcherStatus(name=st.name, kind=st.kind or st.name.split("/")[0],
                                  databases_found=st.databases_found, unpublished=list(st.unpublished))
    if st.last_success is not None:
        out.last_success_time.CopyFrom(ts(st.last_success))
    if st.last_error:
        out.last_error = st.last_error_detail or st.last_error
        if st.last_error_time is not None:
            out.last_error_time.CopyFrom(ts(st.last_error_time))
    return out
