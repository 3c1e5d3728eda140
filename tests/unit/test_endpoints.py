"""Several auth addresses: what `auth_server` / `join_server` accept and the gRPC target
and join order they become."""

from __future__ import annotations

import json

import pytest

from services.common import endpoints
from services.common.config import ConfigError, load_config


def _cfg(**data):
    return load_config(environ={}, data=data)


def test_a_yaml_list_a_comma_string_and_an_environment_variable_give_the_same_addresses():
    want = ["10.0.0.1:3025", "10.0.0.2:3025"]
    assert _cfg(auth_server=["10.0.0.1:3025", "10.0.0.2"]).auth_addresses() == want
    assert _cfg(auth_server="10.0.0.1, 10.0.0.2:3025").auth_addresses() == want
    env = load_config(environ={"CACHEGATE_AUTH_SERVER": "[10.0.0.1, '10.0.0.2:3025']"}, data={})
    # CACHEGATE_AUTH_SERVER is cgctl's variable, not a config key: the file's default stays.
    assert env.auth_addresses() == ["127.0.0.1:3025"]


def test_join_addresses_follow_each_auth_host_unless_given():
    assert _cfg(auth_server=["a.example:3025", "b.example:4025"]).join_addresses() == [
        "a.example:3026", "b.example:3026"]
    assert _cfg(auth_server="a:1", join_server=["j1:7", "j2"]).join_addresses() == ["j1:7", "j2:3026"]


@pytest.mark.parametrize("bad", [["a:b"], [], "", "host:99999"])
def test_a_bad_address_is_a_one_line_error_that_names_the_key(bad):
    with pytest.raises(ConfigError) as exc:
        _cfg(auth_server=bad)
    msg = str(exc.value)
    assert "\n" not in msg and "auth_server" in msg and "host:port" in msg and "Value error" not in msg


def test_grpc_targets():
    assert endpoints.grpc_target("10.0.0.1:3025", 3025) == "10.0.0.1:3025"
    # One name: gRPC's DNS resolver keeps every address it returns (and resolves again).
    assert endpoints.grpc_target("auth.example.com", 3025) == "dns:///auth.example.com:3025"
    fake = {"auth-a": ["10.0.0.5"], "auth-b": ["10.0.0.6", "fd00::6"]}.get
    assert endpoints.grpc_target(["auth-a", "auth-b:4000", "10.0.0.5:3025"], 3025, resolver=lambda h, p: fake(h)) \
        == "ipv4:10.0.0.5:3025,10.0.0.6:4000"
    assert endpoints.grpc_target(["[::1]:1", "[::1]:2"], 3025) == "ipv6:[::1]:1,[::1]:2"


def test_join_tries_every_resolved_address_of_a_name():
    fake = {"auth": ["10.0.0.1", "10.0.0.2"]}.get
    assert endpoints.expand("auth,10.0.0.3:9", 3026, resolver=lambda h, p: fake(h)) == [
        ("10.0.0.1", 3026), ("10.0.0.2", 3026), ("10.0.0.3", 9)]


def test_service_config_balances_and_retries_only_safe_methods():
    cfg = json.loads(endpoints.service_config(endpoints.RETRYABLE_AUTH_METHODS))
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    names = {(n["service"].rsplit(".", 1)[-1], n["method"]) for n in cfg["methodConfig"][0]["name"]}
    assert ("UserService", "Login") in names and ("AuditService", "EmitAuditEvents") in names
    assert ("UserService", "CreateUser") not in names and ("UserService", "RedeemInvite") not in names
    assert cfg["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_every_retryable_method_exists():
    from cachegate.auth.v1 import (
        audit_service_pb2, cluster_service_pb2, database_service_pb2, lock_service_pb2, role_service_pb2,
        token_service_pb2, user_service_pb2,
    )

    services = {}
    for mod in (audit_service_pb2, cluster_service_pb2, database_service_pb2, lock_service_pb2, role_service_pb2,
                token_service_pb2, user_service_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            services[svc.full_name] = {m.name for m in svc.methods}
    for svc, methods in endpoints.RETRYABLE_AUTH_METHODS.items():
        assert set(methods) <= services[svc], (svc, set(methods) - services[svc])


async def test_join_with_no_join_port_answering_names_every_address_in_one_line():
    from services.common.join import JoinError, join
    from tests.helpers import free_port

    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with pytest.raises(JoinError) as exc:
        await join(dead, "tok", "sha256:" + "0" * 64, 2, [])
    msg = str(exc.value)
    assert "\n" not in msg and dead[0] in msg and dead[1] in msg and "nc -zv" in msg
