"""Join token rules, against a real auth process over the network."""

from __future__ import annotations

import json
import time

import pytest

from cachegate.types.v1 import types_pb2
from services.common.join import JoinError, ensure_joined, join
from services.common.pki import CertAuthority

pytestmark = pytest.mark.slow

DISCOVERY = types_pb2.SERVICE_ROLE_DISCOVERY
DBPROXY = types_pb2.SERVICE_ROLE_DBPROXY


@pytest.fixture
def auth(cluster):
    cluster.start_auth()
    return cluster


async def test_token_is_single_use(auth):
    token = auth.token("proxy")
    creds = await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert creds.identity.service_role == DBPROXY
    with pytest.raises(JoinError, match="already used"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    # A used token no longer shows in the list.
    assert json.loads(auth.cgctl("tokens", "ls", "--format=json").stdout) == []


async def test_a_db_token_joins_one_discovery_and_one_dbproxy(auth):
    token = auth.token("db")
    await join(auth.join_addr, token, auth.ca_pin, DISCOVERY, ["127.0.0.1"])
    with pytest.raises(JoinError, match="already used"):
        await join(auth.join_addr, token, auth.ca_pin, DISCOVERY, ["127.0.0.1"])
    assert len(json.loads(auth.cgctl("tokens", "ls", "--format=json").stdout)) == 1  # dbproxy may still join
    await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    with pytest.raises(JoinError, match="already used"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert json.loads(auth.cgctl("tokens", "ls", "--format=json").stdout) == []


async def test_reusable_token_works_until_it_expires(auth):
    token = auth.token("db", "--reusable", "--ttl=3s")
    a = await join(auth.join_addr, token, auth.ca_pin, DISCOVERY, ["127.0.0.1"])
    b = await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert a.identity.name != b.identity.name
    time.sleep(3.5)
    with pytest.raises(JoinError, match="expired"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])


async def test_expired_token_is_refused(auth):
    token = auth.token("proxy", "--ttl=1s")
    time.sleep(1.5)
    with pytest.raises(JoinError, match="expired"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])


async def test_unknown_and_deleted_tokens_are_refused(auth):
    with pytest.raises(JoinError, match="not valid"):
        await join(auth.join_addr, "0" * 32, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    token = auth.token("proxy")
    listed = json.loads(auth.cgctl("tokens", "ls", "--format=json").stdout)
    auth.cgctl("tokens", "rm", listed[0]["id"])
    with pytest.raises(JoinError, match="not valid"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])


async def test_wrong_type_token_is_refused_and_not_used_up(auth):
    token = auth.token("discovery")
    with pytest.raises(JoinError, match=r"for discovery, not dbproxy.*--type=proxy"):
        await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    creds = await join(auth.join_addr, token, auth.ca_pin, DISCOVERY, ["127.0.0.1"])
    assert creds.identity.service_role == DISCOVERY


async def test_wrong_ca_pin_stops_before_the_token_is_sent(auth):
    token = auth.token("proxy")
    other_pin = CertAuthority.create("x", "y").pin
    with pytest.raises(JoinError, match="does not match the CA pin"):
        await join(auth.join_addr, token, other_pin, DBPROXY, ["127.0.0.1"])
    # The token was never presented, so it still works with the right pin.
    creds = await join(auth.join_addr, token, auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert creds.identity.service_role == DBPROXY


async def test_missing_token_or_pin_says_what_to_pass(auth, tmp_path):
    with pytest.raises(JoinError, match="--token"):
        await ensure_joined(tmp_path / "h", auth.join_addr, "", auth.ca_pin, DBPROXY, [])
    with pytest.raises(JoinError, match="--ca-pin"):
        await join(auth.join_addr, "abc", "", DBPROXY, [])
    with pytest.raises(JoinError, match="does not exist"):
        await ensure_joined(tmp_path / "h", auth.join_addr, "/nonexistent/token", auth.ca_pin, DBPROXY, [])


async def test_joined_credentials_are_saved_private_and_reused(auth, tmp_path):
    folder = tmp_path / "host"
    token_file = tmp_path / "token"
    token_file.write_text(auth.token("proxy") + "\n")
    first = await ensure_joined(folder, auth.join_addr, str(token_file), auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct((folder / "host.key").stat().st_mode & 0o777) == "0o600"
    again = await ensure_joined(folder, auth.join_addr, "", auth.ca_pin, DBPROXY, ["127.0.0.1"])
    assert again.cert_pem == first.cert_pem


def test_service_with_a_bad_token_exits_with_one_clear_line(auth):
    cfg = auth.joiner_config("dbproxy", token="f" * 32)
    p = auth.proc("dbproxy", cfg).start(expect_fail=True)
    assert p.popen.wait(30) == 1
    assert "ERROR: joining the cluster failed: the join token is not valid" in p.output()
    assert "f" * 32 not in p.output()


def test_tokens_add_text_prints_the_token_alone_and_json_carries_the_pin(auth):
    res = auth.cgctl("tokens", "add", "--type=db")
    token = res.stdout.strip()
    assert res.stdout == token + "\n" and len(token) >= 32
    assert auth.ca_pin in res.stderr and "--ca-pin=" in res.stderr
    data = json.loads(auth.cgctl("tokens", "add", "--type=proxy", "--ttl=1h", "--format=json").stdout)
    assert data["ca_pin"] == auth.ca_pin and data["roles"] == ["dbproxy"] and data["single_use"] is True
    ids = {t["id"] for t in json.loads(auth.cgctl("tokens", "ls", "--format=json").stdout)}
    assert data["id"] in ids and len(ids) == 2
    table = auth.cgctl("tokens", "ls").stdout
    assert token not in table and data["token"] not in table  # the list never shows secrets
    bad = auth.cgctl("tokens", "add", "--type=admin", check=False)
    assert bad.returncode != 0 and "use --type=db, discovery or proxy" in bad.stderr
