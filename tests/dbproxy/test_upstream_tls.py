"""TLS to the database: a new upstream connection resumes the server's TLS session (no
certificate exchange again), and a stored session never stands in for verifying a server
it was not made with."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest

from services.common.pki import CertAuthority, cert_to_pem, key_to_pem, new_key
from services.dbproxy.upstream import DatabaseTLS, StaticCredentials, UpstreamError, UpstreamTarget, connect_upstream

from .conftest import REDIS_PASSWORD, certs, free_port, redis_server  # noqa: F401 (fixtures)


async def _ping(up) -> bytes:
    up.writer.write(b"*1\r\n$4\r\nPING\r\n")
    return await asyncio.wait_for(up.reader.readline(), 5)


async def test_the_second_connection_resumes_the_tls_session_and_works(certs, redis_server):  # noqa: F811
    tls = DatabaseTLS()
    ctx = tls.context(open(certs.path("server-ca.pem")).read())
    target = UpstreamTarget("orders", "127.0.0.1", redis_server.port, ctx)
    creds = StaticCredentials(None, REDIS_PASSWORD)
    reused = []
    for _ in range(3):
        up = await connect_upstream(target, creds, 0, timeout=5)
        reused.append(up.writer.get_extra_info("ssl_object").session_reused)
        assert await _ping(up) == b"+PONG\r\n"
        up.writer.close()
    assert reused == [False, True, True]


async def test_a_stored_session_does_not_let_an_untrusted_server_pass(certs, redis_server, tmp_path):  # noqa: F811
    tls = DatabaseTLS()
    ctx = tls.context(open(certs.path("server-ca.pem")).read())
    creds = StaticCredentials(None, REDIS_PASSWORD)
    up = await connect_upstream(UpstreamTarget("orders", "127.0.0.1", redis_server.port, ctx), creds, 0, timeout=5)
    up.writer.close()
    # Another server at the same name, with a certificate from a CA nobody trusts: it cannot
    # use the ticket, so the handshake is a full one, and verification refuses it.
    rogue_ca = CertAuthority.create("rogue", "rogue")
    key = new_key()
    cert = rogue_ca.sign(key.public_key(), "127.0.0.1", None, dt.timedelta(hours=1), ips=["127.0.0.1"], server=True)
    (tmp_path / "rogue.crt").write_bytes(cert_to_pem(cert))
    (tmp_path / "rogue.key").write_bytes(key_to_pem(key))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "rogue.crt", tmp_path / "rogue.key")
    got = []

    async def handle(reader, writer):
        got.append(await reader.read(100))
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=sctx)
    try:
        with pytest.raises(UpstreamError) as err:
            await connect_upstream(UpstreamTarget("orders", "127.0.0.1", port, ctx), creds, 0, timeout=5)
        assert err.value.reason == "tls" and "TLS handshake" in str(err.value)
        assert not any(REDIS_PASSWORD.encode() in g for g in got)  # the password never went there
    finally:
        server.close()
        await server.wait_closed()
