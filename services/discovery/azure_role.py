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


def entra_access_instructions(subscription: str, resource_group: Optional[str] = None) -> str:
    """What to run in Azure so that dbproxy reaches caches with access keys disabled through
    Entra ID: the data-plane access policy assignment (Azure's "Data Access Configuration")
    for the proxy's principal on each cache. The custom role above covers the control plane
    only (discovery, listKeys); Entra ID access to the data is granted per cache."""
    rg = resource_group or "<resource-group>"
    return f"""# Databases with access keys disabled (auth: entra in `cgate db ls -v`) are reached with an
# Entra ID token of dbproxy's identity: AUTH <object id> <token>. The role above is not enough:
# give that identity a data access policy on each such cache (Azure portal: the cache >
# Settings > Data Access Configuration > Add > New Redis User, policy "Data Owner").
#
# 1. The object id of dbproxy's identity (the oid claim of its tokens):
#      managed identity of a VM:  az vm identity show -g {rg} -n <vm> --query principalId -o tsv
#      app registration:          az ad sp show --id <application-client-id> --query id -o tsv
# 2. Azure Cache for Redis (subscription {subscription}):
#      az redis update -g {rg} -n <cache> --set redisConfiguration.aad-enabled=true
#      az redis access-policy-assignment create -g {rg} -n <cache> \\
#        --access-policy-assignment-name cachegate-dbproxy --access-policy-name "Data Owner" \\
#        --object-id <object-id> --object-id-alias cachegate-dbproxy
# 3. Azure Managed Redis / Redis Enterprise:
#      az redisenterprise database access-policy-assignment create -g {rg} --cluster-name <cluster> \\
#        --database-name default --access-policy-assignment-name cachegatedbproxy \\
#        --access-policy-name default --object-id <object-id>
# 4. Check: `cgate db connect <database>` then PING. Errors:
#      WRONGPASS invalid username-password pair -> the object id has no access policy on that
#        cache (step 2/3), or Entra ID is not enabled on it
#      Entra ID token could not be obtained: ... -> dbproxy has no working credential: attach the
#        managed identity or set AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET; restart it
#      a session ends about an hour after it started -> the token expired without a re-AUTH;
#        see docs/azure-setup.md, "Entra ID"
"""
