"""The Azure custom role discovery and dbproxy need, as the JSON Azure's portal accepts.

Discovery needs only the ``*/read`` actions; dbproxy only the ``*/listKeys/action`` ones.
``cachegate db configure azure-role --subscription=ID [--service=discovery|dbproxy]`` prints it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

READ_ACTIONS = (
    "Microsoft.Cache/redis/read",
    "Microsoft.Cache/redisEnterprise/read",
    "Microsoft.Cache/redisEnterprise/databases/read",
)
LIST_KEYS_ACTIONS = (
    "Microsoft.Cache/redis/listKeys/action",
    "Microsoft.Cache/redisEnterprise/databases/listKeys/action",
)
ALL_ACTIONS = (
    "Microsoft.Cache/redis/read",
    "Microsoft.Cache/redis/listKeys/action",
    "Microsoft.Cache/redisEnterprise/read",
    "Microsoft.Cache/redisEnterprise/databases/read",
    "Microsoft.Cache/redisEnterprise/databases/listKeys/action",
)

SERVICES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "all": (
        "CachegateDiscovery",
        "Allows Cachegate to discover Azure Cache For Redis databases and list keys",
        ALL_ACTIONS,
    ),
    "discovery": (
        "CachegateDiscoveryReader",
        "Allows the Cachegate discovery service to discover Azure Cache For Redis databases",
        READ_ACTIONS,
    ),
    "dbproxy": (
        "CachegateDatabaseKeys",
        "Allows the Cachegate database proxy to list Azure Cache For Redis access keys",
        LIST_KEYS_ACTIONS,
    ),
}

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def actions_for(service: str = "all") -> list[str]:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; use one of {', '.join(SERVICES)}")
    return list(SERVICES[service][2])


def role_definition(
    subscription: str,
    service: str = "all",
    *,
    resource_group: Optional[str] = None,
    role_name: Optional[str] = None,
) -> dict[str, Any]:
    """The custom role definition for ``service`` ('all', 'discovery' or 'dbproxy'),
    assignable in ``subscription`` (or only in ``resource_group`` of it)."""
    subscription = (subscription or "").strip()
    if subscription.startswith("/subscriptions/"):
        subscription = subscription[len("/subscriptions/") :].strip("/")
    if not _GUID.match(subscription):
        raise ValueError(f"subscription must be a subscription id (a GUID), got {subscription!r}")
    name, description, actions = SERVICES.get(service) or (None, None, None)
    if name is None:
        raise ValueError(f"unknown service {service!r}; use one of {', '.join(SERVICES)}")
    scope = f"/subscriptions/{subscription}"
    if resource_group:
        scope += f"/resourceGroups/{resource_group}"
    return {
        "properties": {
            "roleName": role_name or name,
            "description": description,
            "assignableScopes": [scope],
            "permissions": [
                {
                    "actions": list(actions),
                    "notActions": [],
                    "dataActions": [],
                    "notDataActions": [],
                }
            ],
        }
    }


def role_definition_json(subscription: str, service: str = "all", **kwargs: Any) -> str:
    return json.dumps(role_definition(subscription, service, **kwargs), indent=2)
