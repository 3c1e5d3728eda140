"""Live sessions re-authenticate in band before their token expires, in every state.

A real redis-server, the real listener, and a token service like Entra ID's: tokens for one
principal live LIFETIME seconds, each is the password of the Redis ACL user named by the
principal's object id (Azure's own scheme), and an enforcer kills every connection whose last
AUTH is older than a token's life, as Azure does. Sessions stay up across several refreshes
and the enforcer ends none of them."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis

from .conftest import RawClient

pytestmark = pytest.mark.slow

LIFETIME = 3.0
OID = "0d1c5c2e-1111-4000-8000-00000000beef"


class Tokens:
    """The token service: ``expiring()`` as services.dbproxy.entra.EntraCredentials gives it."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.seq = itertools.count(1)
        self.issued: list[str] = []
        self.lock = threading.Lock()
        self.current: tuple[str, float] | None = None
        self._issue()

    def _issue(self) -> None:
        token = f"token-{next(self.seq)}-{time.monotonic_ns()}"
        # Azure accepts the current tokens of a principal; the old ones stay valid until expiry.
        self.admin.execute_command("ACL", "SETUSER", OID, "on", f">{token}", "~*", "&*", "+@all")
        self.issued.append(token)
        self.current = (token, time.time() + LIFETIME)

    async def get(self, force_refresh: bool = False):
        user, token, _ = await self.expiring(force_refresh)
        return user, token

    async def expiring(self, force_refresh: bool = False):
        with self.lock:
            token, exp = self.current
            if force_refresh or exp - time.time() < LIFETIME / 2:
                self._issue()
                token, exp = self.current
        return OID, token, exp


class Enforcer(threading.Thread):
    """Azure's side: a connection whose last AUTH is older than LIFETIME is closed. It sees
    the AUTHs with MONITOR (Redis shows them, their arguments redacted) and the connections
    with CLIENT LIST."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.killed: list[str] = []
        self.last_auth: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        import re
        import socket
        import ssl

        from services.dbproxy.resp import encode_command as C

        ctx = ssl.create_default_context(cafile=self.server.certs.path("server-ca.pem"))
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.server.port), timeout=10),
                               server_hostname="127.0.0.1")
        sock.sendall(C("AUTH", self.server.password) + C("MONITOR"))
        auth_line = re.compile(rb'\[\d+ ([^\]]+)\] "(?:AUTH|HELLO)"', re.I)
        admin = self.server.client()
        buf = b""
        sock.settimeout(0.1)
        self.ready.set()
        while not self.stop.is_set():
            try:
                buf += sock.recv(65536)
            except TimeoutError:
                pass
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                m = auth_line.search(line)
                if m:
                    self.last_auth[m.group(1).decode()] = time.time()
            now = time.time()
            for c in admin.client_list():
                if c.get("user") != OID:
                    continue
                addr = c["addr"]
                # Seen before its AUTH line was read: counted from now (the MONITOR line is due).
                if now - self.last_auth.setdefault(addr, now) > LIFETIME:
                    try:
                        admin.client_kill(addr)
                    except redis.ResponseError:  # gone already
                        continue
                    self.killed.append(addr)
        sock.close()


@pytest.fixture
def entra(proxy, redis_server, certs):
    admin = redis_server.client()
    tokens = Tokens(admin)
    enforcer = Enforcer(redis_server)
    enforcer.start()
    assert enforcer.ready.wait(10)
    users = []

    def user(name: str):
        proxy.overrides[name] = {"credentials": tokens}
        users.append(name)
        return certs.user_cert(name, roles=("access", "ops"), db_names=("*",), tag="entra")

    yield tokens, enforcer, user
    enforcer.stop.set()
    enforcer.join(5)
    for name in users:
        proxy.overrides.pop(name, None)
    admin.execute_command("ACL", "DELUSER", OID)


def test_sessions_stay_up_across_token_refreshes_in_every_state(proxy, redis_server, entra):
    tokens, enforcer, user = entra
    admin = redis_server.client()
    admin.delete("ra:list")
    errors: list[str] = []
    results: dict[str, object] = {}
    deadline = time.monotonic() + 4 * LIFETIME  # at least 3 refreshes

    def plain():
        c = proxy.client(user("ra-plain"))
        n = 0
        while time.monotonic() < deadline:
            assert c.incr("ra:n") > 0
            n += 1
            time.sleep(0.2)
        results["plain"] = n
        c.close()

    def subscribed(protocol: int):
        c = proxy.client(user(f"ra-sub{protocol}"), protocol=protocol)
        ps = c.pubsub()
        ps.subscribe(f"ra:ch{protocol}")
        ps.psubscribe(f"ra:p{protocol}*")
        got = []
        while time.monotonic() < deadline + 1.5:
            m = ps.get_message(timeout=0.5)
            if m and m["type"] in ("message", "pmessage"):
                got.append((m["type"], m["data"]))
        results[f"sub{protocol}"] = got
        ps.close()
        c.close()

    def blocked():
        c = proxy.client(user("ra-block"), socket_timeout=30)
        results["blpop"] = c.blpop("ra:list", 0)
        results["after_blpop"] = c.ping()
        c.close()

    def transaction():
        raw = RawClient(proxy.port, proxy.certs.path("server-ca.pem"), user("ra-multi"))
        from services.dbproxy.resp import encode_command as C

        raw.send(C("MULTI") + C("SET", "ra:m", "1"))
        assert raw.read(2) == [b"OK", b"QUEUED"]
        while time.monotonic() < deadline:
            time.sleep(0.5)
            raw.send(C("INCR", "ra:m"))
            assert raw.read(1) == [b"QUEUED"]
        raw.send(C("EXEC"))
        results["exec"] = raw.read(1)[0]
        raw.close()

    def run(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{fn.__name__}{args}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=a) for a in
               ((plain,), (subscribed, 2), (subscribed, 3), (blocked,), (transaction,))]
    for t in threads:
        t.start()
    publisher = redis_server.client()
    sent = []
    time.sleep(0.5)
    while time.monotonic() < deadline:
        for p in (2, 3):
            publisher.publish(f"ra:ch{p}", f"m{len(sent)}")
            publisher.publish(f"ra:p{p}x", f"m{len(sent)}")
        sent.append(len(sent))
        time.sleep(0.25)
    admin.rpush("ra:list", "woken")
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(tokens.issued) >= 4  # the tokens really were renewed (3 refreshes at least)
    assert enforcer.killed == []  # and no proxied connection outlived its token
    assert results["plain"] > 10
    for p in (2, 3):
        want = [(kind, f"m{i}".encode()) for i in sent for kind in ("message", "pmessage")]
        assert sorted(results[f"sub{p}"]) == sorted(want), p  # none lost, none twice
    assert results["blpop"] == (b"ra:list", b"woken") and results["after_blpop"] is True
    n_incr = results["exec"]
    assert isinstance(n_incr, list) and n_incr[0] == b"OK" and n_incr[-1] == len(n_incr)  # 1, then INCRs


def test_without_renewal_the_enforcer_does_end_a_connection(proxy, redis_server, entra):
    """The enforcer is real: a connection that keeps its first token is closed."""
    import socket
    import ssl

    from services.dbproxy.resp import encode_command as C

    tokens, enforcer, _ = entra
    ctx = ssl.create_default_context(cafile=proxy.certs.path("server-ca.pem"))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", redis_server.port), timeout=10),
                           server_hostname="127.0.0.1")
    sock.sendall(C("AUTH", OID, tokens.current[0]) + C("PING"))
    time.sleep(0.3)
    assert sock.recv(100) == b"+OK\r\n+PONG\r\n"
    time.sleep(LIFETIME + 1.5)
    try:
        sock.sendall(C("PING"))
        closed = sock.recv(100) == b""
    except (ConnectionError, ssl.SSLError):
        closed = True
    assert closed and enforcer.killed
    sock.close()


def test_no_new_token_the_session_works_until_expiry_then_ends_with_one_line(proxy, entra):
    """The token endpoint down: a live session keeps working on its token until it expires,
    then ends with a clear error (not a dead connection)."""
    tokens, enforcer, user = entra

    class Down(Exception):
        pass

    real = tokens.expiring
    failing = {"on": False}

    async def expiring(force_refresh: bool = False):
        if failing["on"]:
            raise Down("DefaultAzureCredential failed to retrieve a token from the included credentials.\nmore")
        return await real(force_refresh)

    tokens.expiring = expiring
    raw = RawClient(proxy.port, proxy.certs.path("server-ca.pem"), user("ra-down"))
    from services.dbproxy.resp import encode_command as C

    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    failing["on"] = True
    started = time.monotonic()
    last = None
    while time.monotonic() - started < 3 * LIFETIME:
        raw.send(C("PING"))
        try:
            last = raw.read(1, timeout=2)[0]
        except (EOFError, TimeoutError) as exc:
            last = exc
            break
        if isinstance(last, Exception):
            break
        time.sleep(0.2)
    lived = time.monotonic() - started
    assert isinstance(last, Exception) and "could not be obtained: DefaultAzureCredential failed" in str(last)
    assert "\n" not in str(last) and LIFETIME / 3 < lived < LIFETIME + 2  # worked until its token expired
    assert raw.closed(5)
    raw.close()


def test_commands_behind_a_capped_block_are_bounded_and_keep_their_order(proxy, redis_server, entra):
    """Behind a blocking command the proxy holds what the client pipelines (so that it can
    re-issue the block first), at most about 1 MiB: then it reads no more until they go."""
    from services.dbproxy.resp import encode_command as C

    tokens, enforcer, user = entra
    admin = redis_server.client()
    admin.delete("ra:q", "ra:after")
    raw = RawClient(proxy.port, proxy.certs.path("server-ca.pem"), user("ra-held"))
    raw.send(C("PING"))
    assert raw.read(1) == [b"PONG"]
    session = next(s for s in proxy.listener.sessions if s.user == "ra-held")
    value = "v" * 1000
    behind = C("RPUSH", "ra:after", value) * 3000  # about 3 MB
    sender = threading.Thread(target=lambda: raw.sock.sendall(C("BLPOP", "ra:q", "0") + behind))
    sender.start()
    peak = 0
    for _ in range(20):
        time.sleep(0.05)
        peak = max(peak, proxy.run(lambda: session.core.held_bytes))
    assert 0 < peak < 2 * 1024 * 1024, peak
    assert admin.llen("ra:after") == 0  # nothing behind the block ran yet, as in Redis
    admin.rpush("ra:q", "x")
    replies = raw.read(3001, timeout=30)
    sender.join(10)
    assert replies[0] == [b"ra:q", b"x"] and replies[1:] == list(range(1, 3001))
    raw.close()
