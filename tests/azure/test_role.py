"""The custom role JSON of the guide, whole and split per service."""

import json

import pytest

from services.discovery.azure_role import role_definition, role_definition_json

SUB = "11111111-2222-3333-4444-555555555555"


def test_whole_role_matches_the_guide():
    role = role_definition(SUB)
    props = role["properties"]
    assert props["roleName"] == "CachegateDiscovery"
    assert props["assignableScopes"] == [f"/subscriptions/{SUB}"]
    assert props["permissions"] == [
        {
            "actions": [
                "Microsoft.Cache/redis/read",
                "Microsoft.Cache/redis/listKeys/action",
                "Microsoft.Cache/redisEnterprise/read",
                "Microsoft.Cache/redisEnterprise/databases/read",
                "Microsoft.Cache/redisEnterprise/databases/listKeys/action",
            ],
            "notActions": [],
            "dataActions": [],
            "notDataActions": [],
        }
    ]
    assert json.loads(role_definition_json(SUB)) == role


def test_split_roles_are_least_privilege():
    discovery = role_definition(SUB, "discovery")["properties"]
    dbproxy = role_definition(SUB, "dbproxy")["properties"]
    assert all(a.endswith("/read") for a in discovery["permissions"][0]["actions"])
    assert all(a.endswith("/listKeys/action") for a in dbproxy["permissions"][0]["actions"])
    assert len(discovery["permissions"][0]["actions"]) == 3 and len(dbproxy["permissions"][0]["actions"]) == 2
    assert discovery["roleName"] != dbproxy["roleName"]
    scoped = role_definition(f"/subscriptions/{SUB}", "discovery", resource_group="rg1")
    assert scoped["properties"]["assignableScopes"] == [f"/subscriptions/{SUB}/resourceGroups/rg1"]


@pytest.mark.parametrize("sub, service", [("", "all"), ("not-a-guid", "all"), (SUB, "everything")])
def test_bad_input(sub, service):
    with pytest.raises(ValueError):
        role_definition(sub, service)


def test_azure_role_command_keeps_json_on_stdout_and_explains_entra_on_stderr():
    from tests.helpers import run_cli

    r = run_cli("cachegate", "db", "configure", "azure-role", f"--subscription={SUB}", "--resource-group=rg1")
    json.loads(r.stdout)
    assert "Data Access Configuration" in r.stderr and "access-policy-assignment create" in r.stderr
    assert "az redisenterprise database access-policy-assignment" in r.stderr and "-g rg1" in r.stderr
    assert "WRONGPASS" in r.stderr and "Entra ID token could not be obtained" in r.stderr
