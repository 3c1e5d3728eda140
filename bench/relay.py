"""A plain TLS relay on uvloop: the floor of a Python data plane, measured beside dbproxy.

    python -m bench.relay --port PORT --redis-port PORT --dir DIR

Mutual TLS in (stunnel's certificate and key from DIR, client certificates checked against
DIR/ca.pem, as the benchmark's stunnel does), TLS to Redis on loopback (checked against
DIR/ca.pem), and the bytes relayed both ways as they come: no parsing, no RBAC, no audit,
no upstream pool (a new Redis connection per client, as stunnel opens). The client sends
AUTH itself. Asyncio Protocols, back-pressure with pause_reading/resume_reading, the same
uvloop and OpenSSL as dbproxy: what dbproxy costs above it is its session's own work.

Not part of Cachegate: the benchmark starts it as one of its targets (``relay``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # The peer reads no more than this side can send.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, connect) -> None:
        super().__init__()
        self._connect = connect

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()  # until Redis is connected
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            _t, up = await self._connect()
        except OSError:
            self.transport.close()
            return
        up.peer, self.peer = self, up
        if self.transport.is_closing():
            up.transport.close()
        else:
            self.transport.resume_reading()


async def serve(port: int, redis_port: int, d: Path) -> None:
    loop = asyncio.get_running_loop()
    inbound = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    inbound.minimum_version = ssl.TLSVersion.TLSv1_2
    inbound.load_cert_chain(d / "stunnel.crt", d / "stunnel.key")
    inbound.load_verify_locations(d / "ca.pem")
    inbound.verify_mode = ssl.CERT_REQUIRED
    outbound = ssl.create_default_context(cafile=str(d / "ca.pem"))

    def connect():
        return loop.create_connection(_Side, "127.0.0.1", redis_port, ssl=outbound, server_hostname="127.0.0.1")

    server = await loop.create_server(lambda: _Client(connect), "127.0.0.1", port, ssl=inbound, backlog=1024)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    ap.add_argument("--redis-port", type=int, required=True, help="the TLS redis-server's loopback port")
    ap.add_argument("--dir", required=True, help="the benchmark's directory (stunnel.crt, stunnel.key, ca.pem)")
    args = ap.parse_args()
    uvloop.run(serve(args.port, args.redis_port, Path(args.dir)))


if __name__ == "__main__":
    main()
