"""Protocol corners: the proxy's bytes compared with Redis's own for the same input.

Each test sends the same bytes to the real redis-server directly (after AUTH) and through
the proxy, and compares what comes back."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
import redis

from services.dbproxy.resp import encode_command

from .conftest import REDIS_PASSWORD

pytestmark = pytest.mark.slow


def C(*args) -> bytes:
    return encode_command(*args)


class Wire:
    """A TLS socket that returns raw bytes (no parsing), for byte-exact comparisons."""

    def __init__(self, port: int, ca: str, cert: tuple[str, str] | None = None) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(*cert)
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="127.0.0.1")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_until_quiet(self, quiet: float = 0.3, limit: float = 10) -> tuple[bytes, bool]:
        """Everything received until nothing came for ``quiet`` seconds; and whether the
        server closed the connection."""
        out = b""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.sock.settimeout(quiet)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return out, False
            except (ConnectionError, ssl.SSLError):
                return out, True
            if not data:
                return out, True
            out += data
        return out, False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fidel(certs):
    """The built-in access role on every logical database: scripts and all data commands."""
    return certs.user_cert("fidel", roles=("access",), db_names=("*",))


@pytest.fixture
def both(proxy, redis_server, fidel):
    """(direct, proxied) raw connections, the direct one authenticated and in logical
    database 3, so that the same commands do not touch each other's keys."""
    ca = proxy.certs.path("server-ca.pem")
    direct = Wire(redis_server.port, ca)
    direct.send(C("AUTH", REDIS_PASSWORD) + C("SELECT", "3"))
    assert direct.recv_until_quiet()[0] == b"+OK\r\n+OK\r\n"
    proxied = Wire(proxy.port, ca, fidel)
    yield direct, proxied
    direct.close()
    proxied.close()


def same(both, data: bytes) -> tuple[bytes, bool]:
    direct, proxied = both
    direct.send(data)
    proxied.send(data)
    want = direct.recv_until_quiet()
    got = proxied.recv_until_quiet()
    assert got == want, (data, want, got)
    return got


@pytest.mark.parametrize("data", [
    b"*-10\r\n" + C("PING"),  # a negative multibulk length is ignored
    b"*-1\r\n*0\r\n" + C("PING"),
    b"\r\n\r\n" + C("PING"),  # empty lines
    b"PING\r\n" + b'SET fid:q "a b\\x41"\r\nGET fid:q\r\n' + b"ECHO 'it''s'\r\n",  # inline, quotes
    b"*3000000000\r\n",  # past INT_MAX: Redis's own error, then closed
    b"*1\r\n$-5\r\n",
    b"*1\r\n+PING\r\n",
    b'SET "unbalanced\r\n',
])
def test_protocol_corners_match_redis(both, data):
    same(both, data)


def test_protocol_error_closes_at_once(both):
    got, closed = same(both, C("PING") + b"*abc\r\n" + C("PING"))
    assert closed and got.startswith(b"+PONG\r\n-ERR Protocol error: invalid multibulk length")


def test_client_reply_off_on_skip_matches_redis(both):
    same(both, C("DEL", "fid:r"))
    got, _ = same(both, C("CLIENT", "REPLY", "OFF") + C("SET", "fid:r", "1") + C("PING") + C("NOSUCHCMD")
                  + C("CLIENT", "REPLY", "ON") + C("GET", "fid:r")
                  + C("CLIENT", "REPLY", "SKIP") + C("INCR", "fid:r") + C("INCR", "fid:r") + C("PING"))
    assert got == b"+OK\r\n$1\r\n1\r\n:3\r\n+PONG\r\n"


def test_client_reply_off_keeps_rbac(proxy, alice, redis_server):
    """No reply while OFF, but every command is still checked: FLUSHALL (denied) is not run."""
    redis_server.client().set("fid:keep", "1")
    w = Wire(proxy.port, proxy.certs.path("server-ca.pem"), alice)
    w.send(C("CLIENT", "REPLY", "OFF") + C("FLUSHALL") + C("SELECT", "7") + C("CLIENT", "REPLY", "ON")
           + C("GET", "fid:keep"))
    assert w.recv_until_quiet()[0] == b"+OK\r\n$1\r\n1\r\n"
    w.close()
    assert redis_server.client().get("fid:keep") == b"1"


def test_deeply_nested_reply_passes_unchanged(both):
    script = ("local t = {} local cur = t for i = 1, 999 do local n = {} cur[1] = n cur = n end "
              "cur[1] = 'leaf' return t")
    got, closed = same(both, C("EVAL", script, "0") + C("PING"))
    assert not closed and got.count(b"*1\r\n") == 1000 and got.endswith(b"$4\r\nleaf\r\n+PONG\r\n")


def test_100_mb_reply_passes_unchanged(proxy, redis_server, alice):
    value = (b"0123456789abcdef" * 65536) * 100  # 100 MiB
    admin = redis_server.client()
    admin.set("fid:big", value)
    try:
        c = proxy.client(alice, socket_timeout=60)
        assert c.get("fid:big") == value
        assert c.ping()
        c.close()
    finally:
        admin.delete("fid:big")


def _kill(redis_server, name: str) -> None:
    admin = redis_server.client()
    for v in [x for x in admin.client_list() if x["name"] == name]:
        admin.client_kill_filter(_id=v["id"])


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_database_closing_the_connection_closes_the_clients(proxy, redis_server, fidel, via):
    """As with Redis itself: a command in flight fails with ConnectionError (never a reply
    the database did not send), and the client's next command works on a new connection."""
    import threading

    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kw = {"retry": Retry(NoBackoff(), 0), "protocol": 2}
    c = redis_server.client(**kw) if via == "direct" else proxy.client(fidel, **kw)
    name = f"fid-victim-{via}"
    c.client_setname(name)
    errors: list[BaseException] = []

    def blocked():
        try:
            c.blpop(f"fid:never:{via}", 10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.5)
    _kill(redis_server, name)
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], redis.ConnectionError), errors
    assert c.ping()
    # Killed while idle: the next command simply works (redis-py sees the close and reconnects).
    c.client_setname(name)
    _kill(redis_server, name)
    time.sleep(0.3)
    assert c.set(f"fid:after:{via}", "1") and c.get(f"fid:after:{via}") == b"1"
    c.close()
