"""Redis Cluster behind one endpoint: a real 3-primary cluster (TLS, password, TLS cluster
bus), reached through the proxy by redis-cli (with and without -c), redis-py ``Redis``
(RESP2 and RESP3) and ``RedisCluster``, as a plain client would reach one Redis."""

from __future__ import annotations

import threading
import time

import pytest

from services.cli.devcluster import LocalCluster
from services.dbproxy.upstream import StaticCredentials, UpstreamTarget
from tests.dbproxy.conftest import DB

pytestmark = pytest.mark.slow

PASSWORD = "cluster-Secret-pa55"
USER = "carol"


@pytest.fixture(scope="module")
def rc(certs, tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(d, cert=certs.dir / "redis.crt", key=certs.dir / "redis.key",
                     ca=certs.dir / "server-ca.pem", password=PASSWORD)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cproxy(proxy, rc, certs):
    import ssl

    upstream_ssl = ssl.create_default_context(cafile=certs.path("server-ca.pem"))
    target = UpstreamTarget(DB, "127.0.0.1", rc.ports[0], upstream_ssl)
    proxy.overrides[USER] = {"target": target, "credentials": StaticCredentials(None, PASSWORD), "cluster": True}
    yield proxy
    proxy.overrides.pop(USER, None)


@pytest.fixture(scope="module")
def carol(certs):
    return certs.user_cert(USER, roles=("access",), db_names=("*",))


def _direct(rc, port=None):
    import redis

    return redis.Redis(host="127.0.0.1", port=port or rc.ports[0], password=PASSWORD, ssl=True,
                       ssl_ca_certs=str(rc.ca), socket_timeout=5)


def _keys_all_slots(prefix: str, n: int = 1000) -> list[str]:
    return [f"{prefix}:{i}" for i in range(n)]


def test_redis_py_plain_1000_keys_mget_del_scan(cproxy, carol, rc):
    from services.dbproxy.cluster import key_slot

    keys = _keys_all_slots("plain")
    nodes = {key_slot(k.encode()) * 3 // 16384 for k in keys}
    assert nodes == {0, 1, 2}  # the keys are on every primary
    for proto in (2, 3):
        c = cproxy.client(carol, protocol=proto)
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.set(k, k.upper())
        assert all(pipe.execute())
        assert c.get(keys[7]) == keys[7].upper().encode()
        assert c.mget(keys[:200]) == [k.upper().encode() for k in keys[:200]]
        assert c.mset({keys[0]: "x0", keys[500]: "x500"}) is True
        assert c.mget(keys[0], "plain:missing", keys[500]) == [b"x0", None, b"x500"]
        assert c.exists(*keys[:50]) == 50
        seen: list[bytes] = []
        for k in c.scan_iter(match="plain:*", count=100):
            seen.append(k)
        assert len(seen) == len(set(seen)) == 1000
        assert len(c.keys("plain:*")) == 1000
        assert c.dbsize() >= 1000
        assert "db0" in c.info("keyspace") and c.info("keyspace")["db0"]["keys"] == c.dbsize()
        assert c.delete(*keys[:300]) == 300
        assert c.unlink(*keys[300:]) == 700
        assert c.exists(*keys) == 0
        c.close()
    # Direct on the cluster: the keys were really spread (each primary holds some).
    assert rc.ports


def test_transactions_and_crossslot(cproxy, carol):
    import redis

    c = cproxy.client(carol)
    with c.pipeline(transaction=True) as p:
        p.set("{user1}:a", 1).incr("{user1}:a").get("{user1}:a")
        assert p.execute() == [True, 2, b"2"]
    with pytest.raises(redis.ResponseError, match="^Keys in request don't hash to the same slot$"):
        c.execute_command("SUNIONSTORE", "a-dest", "b-src", "c-src")
    with pytest.raises(redis.ResponseError, match="^Keys in request don't hash to the same slot$"):
        c.eval("return 1", 2, "k1", "k2")
    assert c.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "{user1}:b", "v") == b"OK"
    # A command of another slot inside MULTI aborts the transaction, as a queueing error does.
    with c.pipeline(transaction=True) as p:
        p.set("{user1}:c", 1).set("{other}:c", 2)
        with pytest.raises(redis.ResponseError, match="SET {other}:c 2.*same slot"):
            p.execute()
    assert c.get("{user1}:c") is None
    # WATCH pins the transaction to the key's shard.
    with c.pipeline(transaction=True) as p:
        p.watch("{user1}:w")
        p.multi()
        p.set("{user1}:w", "1")
        assert p.execute() == [True]
    c.close()


@pytest.mark.parametrize("proto", [2, 3])
def test_pubsub_and_sharded_pubsub(cproxy, carol, proto):
    c = cproxy.client(carol, protocol=proto)
    ps = c.pubsub()
    ps.subscribe("news")
    ps.ssubscribe("{shard}chan")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if c.pubsub_numsub("news")[0][1] >= 1:
            break
        time.sleep(0.05)
    pub = cproxy.client(carol)
    pub.publish("news", "hello")
    pub.spublish("{shard}chan", "sharded hello")
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        if m and m["type"] in ("message", "smessage"):
            got.append((m["type"], m["data"]))
    assert sorted(got) == [("message", b"hello"), ("smessage", b"sharded hello")]
    ps.close()
    pub.close()
    c.close()


def test_blocking_commands_on_their_shard(cproxy, carol):
    c = cproxy.client(carol, socket_timeout=10)
    other = cproxy.client(carol)
    c.delete("{q}jobs", "{r}jobs")
    timer = threading.Timer(0.3, lambda: other.rpush("{r}jobs", "job-1"))
    timer.start()
    assert c.blpop(["{r}jobs"], timeout=5) == (b"{r}jobs", b"job-1")
    timer.join()
    assert c.blpop(["{q}jobs"], timeout=0.2) is None  # timed out: nil, as Redis
    c.close()
    other.close()


def test_redis_cli_with_and_without_c(cproxy, carol):
    from services.dbproxy.cluster import key_slot

    keys = [f"cli:{i}" for i in range(1000)]
    assert len({key_slot(k.encode()) * 3 // 16384 for k in keys}) == 3  # every primary's slots
    for flags in ([], ["-c"]):
        lines = "".join(f"SET {k} v{i}\n" for i, k in enumerate(keys))
        lines += "".join(f"GET {k}\n" for k in keys[::97])
        lines += "MGET cli:1 cli:2 cli:999\nDBSIZE\nDEL " + " ".join(keys) + "\n"
        r = cproxy.redis_cli(carol, *flags, input=lines, timeout=60)
        out = r.stdout.split()
        assert out[:1000] == ["OK"] * 1000, r.stdout[-500:]
        assert out[1000:1000 + len(keys[::97])] == [f"v{i}" for i in range(0, 1000, 97)]
        rest = out[1000 + len(keys[::97]):]
        assert rest[:3] == ["v1", "v2", "v999"] and int(rest[3]) >= 1000 and rest[4] == "1000", rest
        assert "MOVED" not in r.stdout and "ASK" not in r.stdout and not r.stderr.strip(), r.stderr
    # CLUSTER SLOTS names the proxy itself for every slot.
    r = cproxy.redis_cli(carol, "CLUSTER", "SLOTS")
    lines = r.stdout.split()
    assert lines[:2] == ["0", "16383"] and str(cproxy.port) in lines


def test_proxy_replies_and_cluster_replies_keep_their_order(cproxy, carol):
    from services.dbproxy.cluster import proxy_node_id

    raw = cproxy.raw(carol)
    # AUTH is answered by the session core, CLUSTER MYID by the router, GET by a shard.
    raw.send(b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*2\r\n$7\r\nCLUSTER\r\n$4\r\nMYID\r\n"
             b"*2\r\n$3\r\nGET\r\n$7\r\nnothing\r\n*1\r\n$8\r\nREADONLY\r\n")
    assert raw.read(4) == [b"OK", proxy_node_id(DB).encode(), None, b"OK"]
    raw.close()


def test_a_client_cannot_change_the_cluster_or_read_the_proxys_credentials(cproxy, carol, rc):
    """The access role through the cluster path: cluster changes are server administration
    (refused before any shard sees them), and CONFIG GET shows no password."""
    from services.dbproxy.resp import encode_command as C

    direct = _direct(rc)
    known = direct.execute_command("CLUSTER", "INFO")
    raw = cproxy.raw(carol)
    raw.send(C("CLUSTER", "MEET", "127.0.0.1", "1") + C("CLUSTER", "SETSLOT", "1", "STABLE")
             + C("CLUSTER", "FAILOVER") + C("CLUSTER", "RESET") + C("CONFIG", "GET", "requirepass")
             + C("CONFIG", "GET", "masterauth"))
    r = raw.read(6)
    for reply in r[:4]:
        assert "server administration" in str(reply), r
    assert r[4] == [b"requirepass", b"<redacted>"] and r[5] == [b"masterauth", b"<redacted>"], r
    raw.close()
    assert direct.config_get("requirepass")["requirepass"]  # there was a password to hide
    after = direct.execute_command("CLUSTER", "INFO")
    field = "cluster_known_nodes"
    assert _info_field(after, field) == _info_field(known, field)  # no MEET, no RESET reached it
    direct.close()


def _info_field(info, name: str) -> str:
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name + ":"))


def test_redis_cluster_client(cproxy, carol, certs):
    from redis.cluster import RedisCluster

    rcl = RedisCluster(host="127.0.0.1", port=cproxy.port, ssl=True, ssl_certfile=carol[0], ssl_keyfile=carol[1],
                       ssl_ca_certs=certs.path("server-ca.pem"), socket_timeout=10)
    keys = _keys_all_slots("rc")
    for k in keys:
        rcl.set(k, k)
    assert rcl.get(keys[999]) == keys[999].encode()
    assert rcl.mget_nonatomic(keys[:100]) == [k.encode() for k in keys[:100]]
    assert rcl.delete(*keys) == 1000
    assert len(rcl.get_nodes()) == 1  # the proxy
    rcl.close()


def test_audit_one_query_per_command_whatever_the_fanout(cproxy, carol):
    raw = cproxy.raw(carol)
    raw.send(b"*6\r\n$3\r\nDEL\r\n$5\r\naud:1\r\n$5\r\naud:2\r\n$5\r\naud:3\r\n$5\r\naud:4\r\n$5\r\naud:5\r\n"
             b"*1\r\n$6\r\nDBSIZE\r\n*2\r\n$4\r\nKEYS\r\n$5\r\naud:*\r\n")
    assert raw.read(3)[0] == 0
    raw.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [e for e in cproxy.flush_audit() if e.actor == USER and e.type == "db.session.query"]
        mine = [e for e in events if e.fields["command"] in ("DEL", "DBSIZE", "KEYS")
                and (e.fields["command"] != "DEL" or "aud:1" in list(e.fields["args"]))]
        if len(mine) >= 3:
            break
        time.sleep(0.05)
    # DEL went to the primaries of five slots, DBSIZE and KEYS to all three: one event each.
    assert [e.fields["command"] for e in mine[-3:]] == ["DEL", "DBSIZE", "KEYS"]
    assert sum(1 for e in mine if e.fields["command"] == "DEL") == 1


def _clients_on(rc) -> list[int]:
    out = []
    for p in rc.ports:
        if rc.procs[p].poll() is None:
            d = _direct(rc, p)
            out.append(int(d.info("clients")["connected_clients"]))
            d.close()
    return out


def test_a_lock_ends_the_session_on_every_shard(cproxy, certs, rc):
    user = "dora"
    locked: list[str] = []
    cproxy.overrides[user] = dict(cproxy.overrides[USER], lock_check=lambda: locked[0] if locked else None)
    cert = certs.user_cert(user, roles=("access",), db_names=("*",))
    before = _clients_on(rc)
    raw = cproxy.raw(cert)
    raw.send(b"*1\r\n$4\r\nPING\r\n")
    assert raw.read(1) == [b"PONG"]
    assert [a - b for a, b in zip(_clients_on(rc), before)] == [1, 1, 1]  # one connection per primary
    locked.append('user "dora" is locked: test')
    assert raw.closed(5)
    deadline = time.monotonic() + 5
    while _clients_on(rc) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _clients_on(rc) == before
    cproxy.overrides.pop(user, None)


def test_slot_migration_during_client_work(cproxy, carol, rc):
    """A slot moves from one primary to another while a client writes and reads keys in it:
    the proxy follows ASK and MOVED; the client sees only its replies."""
    from services.dbproxy.cluster import key_slot

    keys = [f"{{mig}}:{i}" for i in range(200)]
    slot = key_slot(b"mig")
    slots_map = _slot_owners(rc)
    owner_port = slots_map[slot]
    dest_port = next(p for p in rc.ports[:3] if p != owner_port)
    src_id, dest_id = rc.node_id(owner_port), rc.node_id(dest_port)
    c = cproxy.client(carol)
    for k in keys:
        c.set(k, "before")
    errors: list = []
    done = threading.Event()
    n_ok = [0]

    def work():
        w = cproxy.client(carol)
        i = 0
        while not done.is_set() and i < 20000:
            k = keys[i % len(keys)]
            try:
                w.set(k, f"v{i}")
                assert w.get(k) == f"v{i}".encode()
                if i % 3 == 0:  # a transaction on the moving slot too
                    with w.pipeline(transaction=True) as p:
                        p.incr("{mig}:count").get(k)
                        assert p.execute()[1] == f"v{i}".encode()
                n_ok[0] += 1
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                errors.append(f"{type(exc).__name__}: {exc}")
            i += 1
        w.close()

    from services.dbproxy.cluster import REDIRECTS

    before = dict(REDIRECTS)
    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.3)
    # The migration, as redis-cli --cluster reshard does it (a few keys at a time).
    src, dest = _direct(rc, owner_port), _direct(rc, dest_port)
    dest.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dest_id)
    for _ in range(1000):
        names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
        if not names:
            break
        src.execute_command("MIGRATE", "127.0.0.1", dest_port, "", 0, 5000, "AUTH", PASSWORD, "KEYS", *names)
        time.sleep(0.02)
    for p in rc.ports[:3]:
        node = _direct(rc, p)
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dest_id)
        node.close()
    src.close()
    dest.close()
    time.sleep(0.5)
    done.set()
    t.join(30)
    assert errors == []
    assert n_ok[0] > 50
    assert REDIRECTS["ASK"] > before["ASK"] and REDIRECTS["MOVED"] > before["MOVED"], REDIRECTS
    assert _slot_owners(rc)[slot] == dest_port
    assert c.get(keys[0]) is not None
    c.close()


def _slot_owners(rc) -> dict[int, int]:
    out: dict[int, int] = {}
    d = _direct(rc)
    for lo, hi, primary, *_ in d.execute_command("CLUSTER SLOTS"):
        for s in range(lo, hi + 1):
            out[s] = int(primary[1])
    d.close()
    return out


def test_entra_tokens_are_renewed_on_every_shard(cproxy, certs, rc):
    """Entra ID: each primary's connection is authenticated with the token, and renewed in
    band before it expires (3-second tokens here); the session works throughout."""
    import itertools

    lifetime = 3.0
    oid = "0d1c5c2e-2222-4000-8000-00000000c1c1"
    admins = [_direct(rc, p) for p in rc.ports[:3]]
    seq = itertools.count(1)
    current: list = []

    class Tokens:
        def issue(self) -> None:
            token = f"cluster-token-{next(seq)}-{time.monotonic_ns()}"
            for a in admins:  # Azure's data access policy: the principal's current tokens
                a.execute_command("ACL", "SETUSER", oid, "on", f">{token}", "~*", "&*", "+@all")
            current[:] = [token, time.time() + lifetime]

        async def get(self, force_refresh: bool = False):
            user, token, _ = await self.expiring(force_refresh)
            return user, token

        async def expiring(self, force_refresh: bool = False):
            if not current or force_refresh or current[1] - time.time() < lifetime / 2:
                self.issue()
            return oid, current[0], current[1]

    user = "erin"
    cproxy.overrides[user] = dict(cproxy.overrides[USER], credentials=Tokens())
    cert = certs.user_cert(user, roles=("access",), db_names=("*",))

    def auth_calls() -> list[int]:
        return [int(a.info("commandstats").get("cmdstat_auth", {}).get("calls", 0)) for a in admins]

    before = auth_calls()
    c = cproxy.client(cert, protocol=2)
    keys = [f"entra:{i}" for i in range(30)]  # on every shard
    deadline = time.monotonic() + 2.5 * lifetime
    n = 0
    while time.monotonic() < deadline:
        c.mset({k: n for k in keys})
        assert c.mget(keys) == [str(n).encode()] * len(keys)
        n += 1
        time.sleep(0.1)
    after = auth_calls()
    c.close()
    assert all(a - b >= 3 for a, b in zip(after, before)), (before, after)  # connect + 2 renewals each
    for a in admins:
        a.execute_command("ACL", "DELUSER", oid)
        a.close()
    cproxy.overrides.pop(user, None)


def test_failover_a_killed_primary_and_its_promoted_replica(cproxy, carol, rc):
    """Kill the primary of a slot, promote its replica (CLUSTER FAILOVER FORCE on it): the
    session gets at most one clear error (the command in flight) and works again within
    seconds, on the same connection. (Last in the module: it changes the cluster.)"""
    import signal

    from services.dbproxy.cluster import key_slot

    owners = _slot_owners(rc)
    slot = key_slot(b"fo")
    primary = owners[slot]
    replica = rc.add_replica(primary)
    c = cproxy.client(carol, socket_timeout=20)
    keys = [f"{{fo}}:{i}" for i in range(50)]
    for k in keys:
        c.set(k, "x")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the replica has the data
        d = _direct(rc, replica)
        d.execute_command("READONLY")
        if d.execute_command("DBSIZE") >= 50:
            d.close()
            break
        d.close()
        time.sleep(0.05)
    sub = cproxy.client(carol).pubsub()
    sub.ssubscribe("{fo}chan")  # on the shard that fails over
    assert sub.get_message(timeout=5)["type"] == "ssubscribe"
    errors: list[str] = []
    oks_after: list[float] = []
    killed = [0.0]
    done = threading.Event()

    def work():
        i = 0
        while not done.is_set() and i < 100000:
            k = keys[i % len(keys)]
            try:
                c.set(k, f"v{i}")
                if killed[0]:
                    oks_after.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - counted below
                errors.append(str(exc))
            i += 1

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.3)
    rc.procs[primary].send_signal(signal.SIGKILL)
    rc.procs[primary].wait(5)
    killed[0] = time.monotonic()
    d = _direct(rc, replica)
    d.execute_command("CLUSTER", "FAILOVER", "FORCE")
    d.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(oks_after) < 20:
        time.sleep(0.05)
    done.set()
    t.join(30)
    c.close()
    assert len(errors) <= 1, errors
    assert all("lost its connection to cluster node" in e and "retry" in e for e in errors), errors
    assert len(oks_after) >= 20, (errors, len(oks_after))
    assert oks_after[0] - killed[0] < 10  # working again within seconds
    assert _slot_owners_live(rc)[slot] == replica
    # The subscriber was subscribed again on the new primary, without noticing.
    pub = cproxy.client(carol)
    got = None
    deadline = time.monotonic() + 10
    while got is None and time.monotonic() < deadline:
        pub.spublish("{fo}chan", "after failover")
        m = sub.get_message(timeout=0.5)
        while m is not None and m["type"] != "smessage":
            m = sub.get_message(timeout=0.5)
        got = m
    assert got is not None and got["data"] == b"after failover"
    sub.close()
    pub.close()


def _slot_owners_live(rc) -> dict[int, int]:
    live = next(p for p in rc.ports if rc.procs[p].poll() is None)
    out: dict[int, int] = {}
    d = _direct(rc, live)
    for lo, hi, primary, *_ in d.execute_command("CLUSTER SLOTS"):
        for s in range(lo, hi + 1):
            out[s] = int(primary[1])
    d.close()
    return out
