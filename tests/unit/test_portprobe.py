"""What `cgate login` makes of a port that is not the proxy's login port (sans-io part)."""

from __future__ import annotations

import socket
import ssl
import threading

from services.cli.portprobe import PortInfo, classify, identify, login_port_hint

SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"


def test_classify_each_kind_of_port():
    assert classify("h2", SETTINGS, None) == "grpc"  # the proxy's login port, auth's join port
    assert classify("h2", b"", ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")) == "grpc-mtls"
    assert classify(None, b"HTTP/1.1 200 OK\r\n\r\n{}", None) == "https"
    assert classify(None, b"-ERR a client certificate is required\r\n", None) == "resp"
    assert classify(None, b"", ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]")) == "tls-mtls"
    assert classify(None, b"", None) == "tls"


def test_hints_name_the_port_and_the_one_to_use():
    web = login_port_hint("proxy.example.com", 3443, PortInfo(
        "https", find={"proxy": {"public_addr": "proxy.example.com:3080"}}))
    assert web == ("proxy.example.com:3443 is the proxy's HTTPS web port (default 3443), not its login port; "
                   "use --proxy=proxy.example.com:3080")
    # An unspecified public address is no use to a user: the default port of the host they typed.
    web = login_port_hint("10.0.0.5", 3443, PortInfo("https", find={"proxy": {"public_addr": "0.0.0.0:3080"}}))
    assert web.endswith("use --proxy=10.0.0.5:3080")
    assert "Redis port" in login_port_hint("h", 3081, PortInfo("resp"))
    assert "auth 3025, dbproxy API 3082, discovery 3027" in login_port_hint("h", 3025, PortInfo("grpc-mtls"))
    assert login_port_hint("h", 3080, PortInfo("grpc")) is None


def test_identify_a_plain_tcp_port_and_a_closed_one():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def answer():
        conn, _ = srv.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        info = identify("127.0.0.1", port, timeout=5)
        assert info is not None and info.kind == "plain"
        assert "does not speak TLS" in login_port_hint("127.0.0.1", port, info)
    finally:
        t.join(5)
        srv.close()
    assert identify("127.0.0.1", port, timeout=2) is None


def test_a_reply_is_read_until_it_is_whole():
    from services.cli.portprobe import _complete

    assert _complete(b"-ERR a client certificate is required\r\n")
    assert not _complete(b"-ERR a client cert")
    assert not _complete(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\":")
    assert _complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert not _complete(b"HTTP/1.1 200 OK\r\n\r\n{}")  # no length: until the server closes
