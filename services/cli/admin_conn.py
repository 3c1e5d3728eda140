"""How cgctl finds the auth server and the identity to call it with.

In order: the --auth-server/--identity flags (or CACHEGATE_AUTH_SERVER /
CACHEGATE_IDENTITY), a config file (-c, CACHEGATE_CONFIG or
/etc/cachegate.yaml) whose auth_service has written its admin identity, and
the session of `cgate login` (a user with the editor role) when only the auth
server is given, and finally the local dev cluster that `cachegate dev` started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.cli.common import CLIError, dev_dir, read_json
from services.common.config import ConfigError, join_hostport, load_config, split_hostport
from services.common.creds import Creds

DEFAULT_CONFIG = Path("/etc/cachegate.yaml")


@dataclass
class AdminConn:
    auth_server: str
    creds: Creds
    source: str


def _profile_creds() -> Creds | None:
    """The current `cgate login` session, for a user with an administrative role (editor)."""
    from services.cli.profile import current_profile

    try:
        prof = current_profile().require_session()
    except CLIError:
        return None
    return Creds(key_pem=prof.key_pem, cert_pem=prof.cert_pem or b"", host_ca_pem=prof.host_ca_pem)


def resolve(auth_server: str | None, identity: str | None, config: str | None) -> AdminConn:
    auth_server = auth_server or os.environ.get("CACHEGATE_AUTH_SERVER")
    identity = identity or os.environ.get("CACHEGATE_IDENTITY")
    config = config or os.environ.get("CACHEGATE_CONFIG")
    if not config and DEFAULT_CONFIG.exists() and not (auth_server and identity):
        config = str(DEFAULT_CONFIG)
    if config and not (auth_server and identity):
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        if not auth_server:
            host, port = split_hostport(cfg.auth_service.listen_addr if cfg.auth_service.enabled else cfg.auth_server, 3025)
            auth_server = join_hostport("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
        identity = identity or str(cfg.service_dir("auth") / "admin-identity.pem")
    if auth_server and not identity:
        prof = _profile_creds()
        if prof is not None:
            return AdminConn(auth_server, prof, "cgate profile")
    if not (auth_server and identity):
        dev = read_json(dev_dir() / "cluster.json")
        auth_server = auth_server or dev.get("auth_server")
        identity = identity or dev.get("admin_identity")
    if not auth_server or not identity:
        raise CLIError("no cluster to talk to: start one with `make dev` (or `cachegate start -c FILE`), "
                       "or pass --auth-server and --identity")
    try:
        creds = Creds.from_identity_file(identity)
    except OSError as exc:
        raise CLIError(f"cannot read identity file {identity}: {exc.strerror}; "
                       "run cgctl on the auth host as the user that runs auth, or pass --identity") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return AdminConn(auth_server, creds, identity)
