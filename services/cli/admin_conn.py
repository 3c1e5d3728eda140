"""How cgctl finds the auth server and the identity to call it with.

The first of these that gives an identity wins; `cgctl status` says which one it was:

1. flags: ``--auth-server`` and ``--identity`` (or ``-c FILE``, the auth host's config);
2. environment: ``CACHEGATE_AUTH_SERVER`` / ``CACHEGATE_IDENTITY`` (or ``CACHEGATE_CONFIG``);
3. the user's own `cgate login` session (a user with the editor role), when the auth server
   is known from 1 or 2;
4. the admin identity of a local config that runs auth (``auth_service.enabled``): the file
   named by ``CACHEGATE_CONFIG``, else the host's config (``/etc/cachegate.yaml``, or
   ``$CACHEGATE_SYSTEM_CONFIG``);
5. the local dev cluster that `cachegate dev` started (``$CACHEGATE_HOME/dev``).

A config without an auth section (such as the one `cachegate db configure create` writes on a
database host) gives no identity, so it never takes over: cgctl goes on down the list. Only a
config named with ``-c`` that has no auth section is an error, because it was asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.cli.common import CLIError, dev_dir, read_json
from services.common.config import (
    ConfigError, join_hostport, load_config, split_hostport, system_config_path,
)
from services.common.creds import Creds


@dataclass
class AdminConn:
    auth_server: str
    creds: Creds
    # Where the identity came from, in words (`cgctl status` prints it).
    source: str
    # The identity file used ("" for a cgate login session).
    identity: str = ""


def _profile_creds() -> tuple[Creds, str] | None:
    """The current `cgate login` session, for a user with an administrative role (editor)."""
    from services.cli.profile import current_profile

    try:
        prof = current_profile().require_session()
    except CLIError:
        return None
    user = prof.meta.get("user", "")
    return (Creds(key_pem=prof.key_pem, cert_pem=prof.cert_pem or b"", host_ca_pem=prof.host_ca_pem),
            f"cgate login of {user or 'this user'} via {prof.proxy}")


def _auth_config(path: str, explicit: bool) -> tuple[str, str] | None:
    """(auth mesh address, admin identity file) of a config that runs auth; None for a config
    without an auth section (an error when the user named it with -c)."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if not cfg.auth_service.enabled:
        if explicit:
            raise CLIError(f"{path} does not run auth (no auth_service section with enabled: true), so it holds no "
                           "admin identity: pass the auth host's config, or --auth-server with --identity")
        return None
    host, port = split_hostport(cfg.auth_service.listen_addr, 3025)
    addr = join_hostport("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
    return addr, str(cfg.service_dir("auth") / "admin-identity.pem")


def _load(auth_server: str, identity: str, source: str) -> AdminConn:
    try:
        creds = Creds.from_identity_file(identity)
    except OSError as exc:
        raise CLIError(f"cannot read identity file {identity} ({source}): {exc.strerror}; "
                       "run cgctl on the auth host as the user that runs auth, or pass --identity") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return AdminConn(auth_server, creds, source, identity)


def resolve(auth_server: str | None, identity: str | None, config: str | None) -> AdminConn:
    # 1 and 2: flags, then the environment.
    server_from = "--auth-server" if auth_server else ""
    if not auth_server and os.environ.get("CACHEGATE_AUTH_SERVER"):
        auth_server, server_from = os.environ["CACHEGATE_AUTH_SERVER"], "CACHEGATE_AUTH_SERVER"
    id_from = "--identity" if identity else ""
    if not identity and os.environ.get("CACHEGATE_IDENTITY"):
        identity, id_from = os.environ["CACHEGATE_IDENTITY"], "CACHEGATE_IDENTITY"
    explicit_cfg = bool(config)
    cfg_from = "--config" if config else ""
    if not config and os.environ.get("CACHEGATE_CONFIG"):
        config, cfg_from = os.environ["CACHEGATE_CONFIG"], "CACHEGATE_CONFIG"

    if auth_server and identity:
        return _load(auth_server, identity, f"{id_from} {identity}")
    # A config named by flag or environment comes before the user's login: it was asked for.
    if config:
        found = _auth_config(config, explicit_cfg)
        if found:
            return _load(auth_server or found[0], identity or found[1], f"admin identity of {config} ({cfg_from})")
    if identity:
        # An identity with no server: the server of the local auth config or dev cluster.
        auth_server = auth_server or _local_auth_server()
        if not auth_server:
            raise CLIError(f"{id_from} given but no auth server: pass --auth-server=HOST:3025 "
                           "(or set CACHEGATE_AUTH_SERVER)")
        return _load(auth_server, identity, f"{id_from} {identity}")
    # 3: the user's own login, when the auth server is known.
    if auth_server:
        prof = _profile_creds()
        if prof is not None:
            return AdminConn(auth_server, prof[0], prof[1])
    # 4: the host's config, if it runs auth.
    sys_cfg = system_config_path()
    skipped = ""
    if sys_cfg.exists() and str(sys_cfg) != config:
        found = _auth_config(str(sys_cfg), False)
        if found:
            return _load(auth_server or found[0], found[1], f"admin identity of {sys_cfg}")
        skipped = f"{sys_cfg} does not run auth; "
    # 5: the dev cluster.
    dev_file = dev_dir() / "cluster.json"
    dev = read_json(dev_file)
    if dev.get("admin_identity") and dev.get("auth_server"):
        return _load(auth_server or dev["auth_server"], dev["admin_identity"], f"dev cluster ({dev_file})")
    if auth_server:
        raise CLIError(f"{server_from} given but no identity to call it with: pass --identity (an admin identity "
                       "file), or log in first with `cgate login` as a user with the editor role")
    raise CLIError(f"no cluster to talk to: {skipped}start one with `make dev` (or `cachegate start -c FILE`), "
                   "or pass --auth-server and --identity")


def _local_auth_server() -> str:
    sys_cfg = system_config_path()
    if sys_cfg.exists():
        try:
            found = _auth_config(str(sys_cfg), False)
        except CLIError:
            found = None
        if found:
            return found[0]
    return read_json(dev_dir() / "cluster.json").get("auth_server", "")

