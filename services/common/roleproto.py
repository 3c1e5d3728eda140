"""The one conversion between the RBAC role model (services.common.rbac.Role) and the API's
``cachegate.types.v1.Role`` message. Servers and CLIs both use it; it has no server deps.

``role_from_proto`` validates through the same code path as a YAML role document, so a role
sent over gRPC gets exactly the checks (and error messages) ``cgctl create -f role.yaml`` gets.
"""

from __future__ import annotations

from typing import Any

from cachegate.types.v1 import types_pb2
from services.common import rbac
from services.common.durations import format_duration
from services.common.grpcutil import dur, from_dur


def _conditions_to_proto(c: rbac.RoleConditions) -> types_pb2.RoleConditions:
    out = types_pb2.RoleConditions(db_users=list(c.db_users), db_names=list(c.db_names),
                                   db_commands=list(c.db_commands),
                                   rules=[types_pb2.AdminRule(resources=list(r.resources), verbs=list(r.verbs))
                                          for r in c.rules])
    for key, values in c.db_labels.items():
        out.db_labels[key].values.extend(values)
    return out


def role_to_proto(role: rbac.Role) -> types_pb2.Role:
    o = role.options
    return types_pb2.Role(
        name=role.name, description=role.description, builtin=rbac.is_builtin(role.name),
        options=types_pb2.RoleOptions(max_session_ttl=dur(o.max_session_ttl),
                                      disconnect_expired_cert=o.disconnect_expired_cert,
                                      client_idle_timeout=dur(o.client_idle_timeout),
                                      max_connections=o.max_connections),
        allow=_conditions_to_proto(role.allow), deny=_conditions_to_proto(role.deny))


def _conditions_to_dict(c: types_pb2.RoleConditions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.db_labels:
        out["db_labels"] = {k: list(v.values) for k, v in c.db_labels.items()}
    for field in ("db_users", "db_names", "db_commands"):
        if getattr(c, field):
            out[field] = list(getattr(c, field))
    if c.rules:
        out["rules"] = [{"resources": list(r.resources), "verbs": list(r.verbs)} for r in c.rules]
    return out


def role_document(msg: types_pb2.Role) -> dict[str, Any]:
    """The role message as a role document (the YAML form), unvalidated."""
    options: dict[str, Any] = {"disconnect_expired_cert": msg.options.disconnect_expired_cert}
    if msg.options.HasField("max_session_ttl"):
        options["max_session_ttl"] = format_duration(from_dur(msg.options.max_session_ttl))
    if msg.options.HasField("client_idle_timeout"):
        # As people write them (12h, 30m), the way a role file has them.
        options["client_idle_timeout"] = format_duration(from_dur(msg.options.client_idle_timeout))
    if msg.options.max_connections:
        options["max_connections"] = msg.options.max_connections
    metadata: dict[str, Any] = {"name": msg.name}
    if msg.description:
        metadata["description"] = msg.description
    return {"kind": rbac.KIND, "version": rbac.VERSION, "metadata": metadata,
            "spec": {"options": options, "allow": _conditions_to_dict(msg.allow),
                     "deny": _conditions_to_dict(msg.deny)}}


def role_from_proto(msg: types_pb2.Role) -> rbac.Role:
    """Validate a role message. Raises rbac.RoleError with a one-line message.

    ``builtin`` in the message is ignored: whether a role is built in is decided by its name.
    """
    return rbac.Role.from_dict(role_document(msg))


__all__ = ["role_to_proto", "role_from_proto", "role_document"]
