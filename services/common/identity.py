"""The identity codec: an ``Identity`` protobuf inside a private X.509 extension.

Identity is read only from certificates whose chain the TLS layer (or
:func:`verify_cert`) has verified; request fields are never trusted for it.
"""

from __future__ import annotations

from cryptography import x509

from cachegate.types.v1 import types_pb2

# A private OID under the UUID arc (ITU-T X.667), which needs no registration.
# Every arc is kept under 31 bits: Go's ASN.1 parser (grpcurl, many tools)
# rejects certificates whose OID arcs do not fit a 32-bit integer.
IDENTITY_OID = x509.ObjectIdentifier("2.25.1721820494.1")

Identity = types_pb2.Identity
ServiceRole = types_pb2.ServiceRole
IdentityKind = types_pb2.IdentityKind

ROLE_NAMES = {
    types_pb2.SERVICE_ROLE_AUTH: "auth",
    types_pb2.SERVICE_ROLE_DISCOVERY: "discovery",
    types_pb2.SERVICE_ROLE_DBPROXY: "dbproxy",
}
ROLE_BY_NAME = {v: k for k, v in ROLE_NAMES.items()}
# The token --type names of the guide ("db" is the database agent: discovery + dbproxy).
TOKEN_TYPES = {
    "db": [types_pb2.SERVICE_ROLE_DISCOVERY, types_pb2.SERVICE_ROLE_DBPROXY],
    "discovery": [types_pb2.SERVICE_ROLE_DISCOVERY],
    "proxy": [types_pb2.SERVICE_ROLE_DBPROXY],
    "dbproxy": [types_pb2.SERVICE_ROLE_DBPROXY],
}


def role_name(role: int) -> str:
    return ROLE_NAMES.get(role, "unspecified")


def encode_identity(identity: Identity) -> bytes:
    return identity.SerializeToString(deterministic=True)


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """Decode the identity extension; ValueError when it is missing or bad."""
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
    except x509.ExtensionNotFound as exc:
        raise ValueError("certificate carries no Cachegate identity") from exc
    ident = Identity()
    try:
        ident.ParseFromString(ext.value.value)
    except Exception as exc:  # DecodeError
        raise ValueError("certificate identity extension is malformed") from exc
    return ident


def describe(identity: Identity) -> str:
    if identity.kind == types_pb2.IDENTITY_KIND_HOST:
        return f"host {identity.name} ({role_name(identity.service_role)})"
    return f"user {identity.name}"
