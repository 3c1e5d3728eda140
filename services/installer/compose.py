"""The one-shot steps of deploy/compose/compose.yaml (run inside the image).

    python -m services.installer.compose init --out /init
        The Redis that stands for Azure Cache for Redis: a CA and a certificate for the host
        ``redis``, a redis.conf with a random password, and the Azure stand-in's state that
        publishes it as ``my-azure-redis`` (with that password as its access key). Kept when
        already there.
    python -m services.installer.compose join --auth-server auth:3025 \\
            --identity /auth-data/auth/admin-identity.pem --out /join
        After auth is up: a join token for discovery and one for dbproxy, and the CA pin,
        as files that their configs name (join.token, join.ca_pin).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sys
import time
from pathlib import Path

import yaml

from services.common.creds import write_private

REDIS_HOST = "redis"
REDIS_TLS_PORT = 6380
DATABASE = "my-azure-redis"
SUBSCRIPTION = "11111111-2222-3333-4444-555555555555"
TENANT = "72f9aa00-0000-4000-8000-00000000c0de"


def init(out: Path) -> None:
    from services.common import pki

    out.mkdir(parents=True, exist_ok=True)
    if (out / "standin.yaml").exists():
        print(f"init: {out} is already set up")
        return
    password = secrets.token_urlsafe(32)
    ca = pki.CertAuthority.create("Cachegate compose Redis CA", "cachegate-compose")
    key = pki.new_key()
    cert = ca.sign(key.public_key(), REDIS_HOST, None, dt.timedelta(days=825), dns_names=[REDIS_HOST, "localhost"],
                   ips=["127.0.0.1"], server=True)
    write_private(out / "redis.key", pki.key_to_pem(key))
    write_private(out / "redis.crt", pki.cert_to_pem(cert))
    write_private(out / "redis-ca.pem", ca.cert_pem)
    write_private(out / "redis.conf", "\n".join([
        "bind 0.0.0.0", "port 0", f"tls-port {REDIS_TLS_PORT}", f"tls-cert-file {out / 'redis.crt'}",
        f"tls-key-file {out / 'redis.key'}", f"tls-ca-cert-file {out / 'redis-ca.pem'}", "tls-auth-clients no",
        f"requirepass {password}", 'save ""', "appendonly no", "dir /tmp", "",
    ]).encode())
    state = {
        "tenant": TENANT,
        "subscriptions": [{"id": SUBSCRIPTION, "display_name": "Cachegate compose"}],
        "managed_identity": {"enabled": True},
        "caches": [{
            "name": DATABASE, "subscription": SUBSCRIPTION, "resourceGroup": "compose-rg", "location": "East US",
            "tags": {"env": "compose"}, "provisioningState": "Succeeded", "hostName": REDIS_HOST,
            "sslPort": REDIS_TLS_PORT, "enableNonSslPort": False, "redisVersion": "7.0",
            "sku": {"name": "Standard", "family": "C", "capacity": 1},
            "keys": {"primary": password, "secondary": secrets.token_urlsafe(32)},
        }],
    }
    write_private(out / "standin.yaml", yaml.safe_dump(state, sort_keys=False).encode())
    print(f"init: wrote the Redis certificate, redis.conf and the Azure stand-in's state to {out}")


async def _tokens(auth_server: str, identity: Path) -> tuple[dict[str, str], str]:
    from cachegate.auth.v1 import token_service_pb2
    from services.common import identity as idmod
    from services.common.authclient import AuthClient
    from services.common.creds import Creds

    out: dict[str, str] = {}
    pin = ""
    async with AuthClient(auth_server, Creds.from_identity_file(str(identity))) as c:
        for service, type_ in (("discovery", "discovery"), ("dbproxy", "proxy")):
            r = await c.tokens.CreateToken(token_service_pb2.CreateTokenRequest(roles=idmod.TOKEN_TYPES[type_]),
                                           timeout=15)
            out[service], pin = r.token, r.ca_pin
    return out, pin


def join(auth_server: str, identity: Path, out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            if not identity.exists():
                raise FileNotFoundError(f"{identity} does not exist yet")
            tokens, pin = asyncio.run(_tokens(auth_server, identity))
            break
        except Exception as exc:  # auth still starting: retry until the deadline
            last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if time.monotonic() > deadline:
                sys.exit(f"join: auth at {auth_server} did not answer within {timeout:g}s: {last}")
            time.sleep(1)
    out.mkdir(parents=True, exist_ok=True)
    for service, token in tokens.items():
        write_private(out / f"{service}.token", token.encode())
    write_private(out / "ca_pin", pin.encode())
    print(f"join: tokens for {', '.join(tokens)} and the CA pin {pin} are in {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.installer.compose", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init", help="Redis TLS files, redis.conf and the Azure stand-in's state")
    pi.add_argument("--out", type=Path, required=True)
    pj = sub.add_parser("join", help="join tokens and the CA pin for discovery and dbproxy")
    pj.add_argument("--auth-server", required=True)
    pj.add_argument("--identity", type=Path, required=True)
    pj.add_argument("--out", type=Path, required=True)
    pj.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.cmd == "init":
        init(args.out)
    else:
        join(args.auth_server, args.identity, args.out, args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
