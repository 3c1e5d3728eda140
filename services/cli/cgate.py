"""cgate: the user's tool. It talks only to dbproxy (its public and API ports)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from typing import Optional

import grpc
import typer

from cachegate.auth.v1 import cluster_service_pb2, user_service_pb2
from cachegate.dbproxy.v1 import proxy_service_pb2, proxy_service_pb2_grpc
from services.cli import cgate_db
from services.cli.common import (
    CLIError, Format, duration_flag, emit, err_console, fail, fmt_time, grpc_message, out_console, rpc, run,
)
from services.cli.profile import (
    Profile, all_profiles, current_profile, normalize_proxy, open_profile, set_current,
)
from services.common.config import DEFAULT_PROXY_PORT, split_hostport
from services.common.grpcutil import dur
from services.common.pki import (
    CertAuthority, cert_to_pem, fetch_unverified_chain, key_to_pem, make_csr, new_key, normalize_pin, spki_pin,
)
from services.common.version import VERSION, major

app = typer.Typer(help="Reach Redis databases through Cachegate.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


@app.command()
def version():
    """Print the client version."""
    print(f"cgate v{VERSION}")


# --------------------------------------------------------------------------------------------
# Trust on first use of the proxy's CA


def _proxy_ca(proxy: str, ca_pin: str | None, known_pem: bytes | None, interactive: bool) -> bytes:
    """The cluster CA that signed the proxy's certificate, once the user trusts it."""
    host, port = split_hostport(proxy, 3080)
    try:
        chain = fetch_unverified_chain(host, port)
    except OSError as exc:
        fail(f"cannot reach the proxy at {proxy}: {exc.strerror or exc}; check the address (the proxy's login "
             f"port is {DEFAULT_PROXY_PORT} by default) and run `nc -zv {host} {port}`")
    if len(chain) < 2:
        fail(f"the server at {proxy} is not a Cachegate proxy (it sent no cluster CA)")
    leaf = chain[0]
    from services.cli.portprobe import cert_service, grpc_port_hint

    service = cert_service(leaf)
    if service and service != "dbproxy":
        fail(grpc_port_hint(host, port, service))
    cas = [c for c in chain[1:] if CertAuthority(c, None).issued(leaf)]  # type: ignore[arg-type]
    if not cas:
        fail(f"the certificate of {proxy} is not signed by the CA it sent; refusing to trust it")
    ca = cas[0]
    pin = spki_pin(ca)
    # An explicit pin is always checked, also when a profile already trusts a CA.
    if ca_pin:
        try:
            want = normalize_pin(ca_pin)
        except ValueError as exc:
            fail(f"--ca-pin: {exc}")
        if want != pin:
            fail(f"the proxy at {proxy} presented CA {pin}, not the --ca-pin {want}: "
                 "check the address and the pin (`cgctl status` prints it)")
    if known_pem is not None:
        if cert_to_pem(ca) == known_pem or spki_pin(_first_cert(known_pem)) == pin:
            return cert_to_pem(ca)
        fail(f"the cluster CA of {proxy} changed (now {pin}): if the cluster was rebuilt, check the pin with "
             f"your administrator (`cgctl status`), then run `cgate logout --proxy={proxy}` and log in again")
    if ca_pin:
        return cert_to_pem(ca)
    if not interactive:
        fail(f"first login to {proxy}: pass --ca-pin={pin} after checking it against `cgctl status` "
             "(a password from stdin leaves no terminal to ask)")
    err_console.print(f"The authenticity of proxy {proxy} can't be established.\n"
                      f"Cluster CA fingerprint: {pin}\n"
                      "Compare it with what your administrator sees in `cgctl status`.", markup=False)
    if not typer.confirm("Trust this cluster and continue?", default=False, err=True):
        fail("the cluster CA was not trusted; nothing was sent")
    return cert_to_pem(ca)


def _check_login_port(proxy: str) -> None:
    """A wrong port of the right host (the web port, the Redis port, a service's mesh port)
    is named as such, with the port to use, before any TLS or ALPN error can confuse."""
    from services.cli.portprobe import identify, login_port_hint

    host, port = split_hostport(proxy, 3080)
    info = identify(host, port)
    hint = login_port_hint(host, port, info) if info is not None else None
    if hint:
        fail(hint)


def _first_cert(pem: bytes):
    from services.common.pki import certs_from_pem

    return certs_from_pem(pem)[0]


def _check_versions(server_version: str) -> None:
    mine, theirs = major(VERSION), major(server_version)
    if mine < 0 or theirs < 0:
        return
    if abs(mine - theirs) > 1:
        fail(f"cgate v{VERSION} cannot talk to a v{server_version} cluster (at most one major version apart): "
             f"install cgate v{theirs}.x")


def _read_secret(prompt: str, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            fail("no password on stdin: pipe it in, e.g. `echo \"$PASSWORD\" | cgate login ... --password-stdin`")
        return value
    if not sys.stdin.isatty():
        fail("no terminal to ask for the password: use --password-stdin and pipe it in")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Confirm password: ") != value:
        fail("the passwords do not match")
    return value


def _totp_setup(user: str, cluster: str, from_stdin: bool) -> tuple[str, str]:
    """A new TOTP secret, shown once to this terminal, and the first code read back."""
    import pyotp

    secret = pyotp.random_base32()
    uri = pyotp.TOTP(secret).provisioning_uri(name=user or "user", issuer_name=f"Cachegate {cluster}")
    err_console.print(f"Add this key to your authenticator app (or open the URI):\n  key: {secret}\n  uri: {uri}",
                      markup=False)
    if from_stdin:
        code = sys.stdin.readline().strip()
    else:
        code = typer.prompt("Enter the 6-digit code it shows", err=True).strip()
    if not code:
        fail("no one-time code given: enter the code your authenticator app shows for the key")
    return secret, code


# --------------------------------------------------------------------------------------------
# login / status / logout


@app.command()
@run
async def login(
    proxy: Optional[str] = typer.Option(None, "--proxy", envvar="CACHEGATE_PROXY",
                                        help="dbproxy public address, HOST:PORT (port 3080 by default)."),
    user: Optional[str] = typer.Option(None, "--user", help="Your Cachegate user name."),
    ttl: Optional[str] = typer.Option(None, "--ttl", help="Session length, e.g. 8h (roles may cap it)."),
    ca_pin: Optional[str] = typer.Option(None, "--ca-pin", help="Expected cluster CA pin (sha256:...)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
    otp: Optional[str] = typer.Option(None, "--otp", help="One-time code from your authenticator app."),
    invite: Optional[str] = typer.Option(None, "--invite", help="Invite from `cgctl users add`: set your password."),
    enable_totp: bool = typer.Option(False, "--enable-totp",
                                     help="With --invite: also set up a one-time-code app (TOTP) as second factor."),
):
    """Log in and get a short-lived session certificate (the private key stays here)."""
    if not proxy:
        try:
            proxy = current_profile().proxy
        except CLIError:
            fail("no proxy: pass --proxy=HOST:PORT (the dbproxy public address, port 3080 by default)")
    proxy = normalize_proxy(proxy)
    seconds = duration_flag(ttl)
    _check_login_port(proxy)
    existing = open_profile(proxy)
    known = existing.host_ca_pem if existing is not None and (existing.folder / "cas.pem").exists() else None
    ca_pem = await asyncio.to_thread(_proxy_ca, proxy, ca_pin, known, not password_stdin and sys.stdin.isatty())
    prof = existing or open_profile(proxy, create=True)
    assert prof is not None
    try:
        done = await _login(prof, proxy, ca_pem, user, seconds, password_stdin, otp, invite, enable_totp)
    except BaseException:
        if existing is None:
            prof.remove()  # a failed first login leaves nothing behind
            with contextlib.suppress(OSError):
                prof.folder.parent.rmdir()  # profiles/, if this was the only one
        raise
    if done:
        _print_status(prof, Format.text)


async def _login(prof, proxy, ca_pem, user, seconds, password_stdin, otp, invite, enable_totp) -> bool:
    """The login itself; False when it ended early on purpose (invite with TOTP set up)."""
    from services.common.creds import write_private

    write_private(prof.folder / "cas.pem", ca_pem)
    prof.save_meta()
    async with prof.public_channel() as ch:
        stub = proxy_service_pb2_grpc.ProxyServiceStub(ch)
        try:
            info = await stub.GetClusterInfo(cluster_service_pb2.GetClusterInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                from services.cli.portprobe import grpc_port_hint

                fail(grpc_port_hint(*split_hostport(proxy, 3080)))
            fail(grpc_message(exc, proxy, "proxy"))
        _check_versions(info.server_version)
        settings = await rpc(stub.GetProxySettings, proxy_service_pb2.GetProxySettingsRequest(), proxy, "proxy")
        if invite:
            password = _read_secret("New password: ", password_stdin, confirm=True)
            req = user_service_pb2.RedeemInviteRequest(invite_token=invite, password=password)
            if enable_totp:
                req.totp_secret, req.totp_code = _totp_setup(user or "", info.cluster_name, password_stdin)
            redeemed = await rpc(stub.RedeemInvite, req, proxy, "proxy")
            if user and user != redeemed.user:
                fail(f"the invite is for user {redeemed.user!r}, not {user!r}")
            user = redeemed.user
            if enable_totp:
                # The code just used cannot be used again: the first login takes the app's next code.
                prof.meta.update(user=user, cluster=info.cluster_name)
                prof.save_meta()
                out_console.print(f"Password and one-time codes are set for {user}. Log in with:\n"
                                  f"  cgate login --proxy={proxy} --user={user} --otp=CODE", markup=False)
                return False
            err_console.print(f"Password set for {user}.", markup=False)
        else:
            if not user:
                user = prof.meta.get("user") or getpass.getuser()
            password = _read_secret(f"Enter password for Cachegate user {user}: ", password_stdin)
        key = new_key()
        req = user_service_pb2.LoginRequest(user=user, password=password, totp_code=otp or "",
                                            csr_pem=make_csr(key, user).decode())
        if seconds:
            req.ttl.CopyFrom(dur(seconds))
        resp = await rpc(stub.Login, req, proxy, "proxy")
    prof.meta.update(user=user, cluster=info.cluster_name, server_version=info.server_version,
                     api_addr=settings.api_listen_addr, redis_addr=settings.redis_listen_addr,
                     web_addr=settings.web_listen_addr)
    if resp.host_ca_pem:
        write_private(prof.folder / "cas.pem", resp.host_ca_pem.encode())
    prof.save_session(key_to_pem(key), resp.cert_pem.encode(), resp.user_ca_pem.encode())
    set_current(prof)
    return True


def _status_data(prof: Profile) -> dict:
    ident = prof.identity
    return {
        "proxy": prof.proxy, "cluster": prof.meta.get("cluster", ""), "user": ident.name if ident else "",
        "roles": list(ident.roles) if ident else [], "db_users": list(ident.db_users) if ident else [],
        "db_names": list(ident.db_names) if ident else [], "valid_until": fmt_time(prof.expires),
        "expired": prof.expired(),
    }


def _print_status(prof: Profile, fmt: Format, current: bool = True) -> None:
    data = _status_data(prof)

    def text():
        left = "EXPIRED" if data["expired"] else _remaining(prof)
        out_console.print(
            f"{'> ' if current else '  '}Profile URL:  https://{data['proxy']}\n"
            f"  Logged in as: {data['user']}\n"
            f"  Cluster:      {data['cluster']}\n"
            f"  Roles:        {', '.join(data['roles']) or '-'}\n"
            f"  DB users:     {', '.join(data['db_users']) or '-'}\n"
            f"  DB names:     {', '.join(data['db_names']) or '-'}\n"
            f"  Valid until:  {data['valid_until']} [{left}]", markup=False, highlight=False)

    emit(data, fmt, text)


def _remaining(prof: Profile) -> str:
    import datetime as dt

    left = prof.expires - dt.datetime.now(dt.timezone.utc)
    secs = int(left.total_seconds())
    h, rem = divmod(secs, 3600)
    return f"valid for {h}h{rem // 60}m" if h else f"valid for {rem // 60}m{rem % 60}s"


@app.command()
@run
async def status(
    proxy: Optional[str] = typer.Option(None, "--proxy", help="Show this proxy's profile."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, json or yaml."),
):
    """Who you are logged in as, your roles and database traits, and when the session ends."""
    prof = current_profile(proxy)
    if prof.cert is None:
        fail(f"not logged in to {prof.proxy}: run `{prof.login_hint()}`")
    _print_status(prof, fmt)
    if prof.expired():
        fail(f"your session expired at {fmt_time(prof.expires)}: log in again with `{prof.login_hint()}`")


@app.command()
def logout(
    proxy: Optional[str] = typer.Option(None, "--proxy", help="Log out of this proxy only (default: all)."),
):
    """Remove the local profile: private key and certificates."""
    profiles = [open_profile(normalize_proxy(proxy))] if proxy else all_profiles()
    profiles = [p for p in profiles if p is not None]
    if not profiles:
        out_console.print("You are not logged in.", markup=False)
        return
    for p in profiles:
        p.remove()
        out_console.print(f"Logged out {p.meta.get('user', '')} from {p.proxy}.", markup=False)


app.add_typer(cgate_db.db_app, name="db")
app.add_typer(cgate_db.proxy_app, name="proxy")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
