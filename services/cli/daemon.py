"""cachegate: run the services (start), a whole local cluster (dev), and db configure."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import grpc
import typer
import yaml

from services.cli.common import CLIError, dev_dir, err_console, out_console
from services.common.config import ConfigError, load_config
from services.common.creds import Creds, private_dir, write_private
from services.common.join import JoinError
from services.common.logs import setup_logging, stop_stderr_routing
from services.common.version import VERSION

app = typer.Typer(help="Run Cachegate services.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)

from services.cli import dbconfigure  # noqa: E402

db_app = typer.Typer(help="Database hosts: configuration and Azure roles.", no_args_is_help=True)
db_app.add_typer(dbconfigure.app, name="configure")
app.add_typer(db_app, name="db")

SERVICES = ("auth", "discovery", "dbproxy")
log = logging.getLogger("cachegate")


@app.command()
def version():
    """Print the version."""
    print(f"Cachegate v{VERSION}")


@app.command()
def start(
    config: Path = typer.Option(..., "--config", "-c", help="The cachegate.yaml to run."),
    service: Optional[list[str]] = typer.Option(None, "--service", help="Run only these services (repeatable)."),
    token: Optional[str] = typer.Option(None, "--token", help="Join token (value or file) for a new host."),
    ca_pin: Optional[str] = typer.Option(None, "--ca-pin", help="CA pin of the cluster (from `cgctl tokens add`)."),
    auth_server: Optional[str] = typer.Option(None, "--auth-server", help="host:port of auth's mesh port; several: a:3025,b:3025 (docs/ha.md)."),
    ready_file: Optional[Path] = typer.Option(None, "--ready-file", help="Write bound ports here as JSON when ready."),
):
    """Run the services enabled in the config (one process)."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        err_console.print(f"ERROR: {exc}", markup=False)
        raise typer.Exit(1) from None
    if token:
        cfg.join.token = token
    if ca_pin:
        cfg.join.ca_pin = ca_pin
    if auth_server:
        cfg.auth_server = auth_server
    enabled = [s for s in SERVICES if getattr(cfg, f"{s}_service").enabled]
    chosen = list(service) if service else enabled
    unknown = [s for s in chosen if s not in SERVICES]
    if unknown:
        err_console.print(f"ERROR: unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}", markup=False)
        raise typer.Exit(1)
    if not chosen:
        err_console.print("ERROR: no service is enabled in the config: set auth_service.enabled, "
                          "discovery_service.enabled or dbproxy_service.enabled to true", markup=False)
        raise typer.Exit(1)
    if "dbproxy" in chosen:
        from services.dbproxy.allocator import AllocatorError, reexec_if_needed

        try:  # before any thread or socket: the process is run again on jemalloc
            reexec_if_needed(cfg.dbproxy_service.allocator, sys.orig_argv, sys.executable)
        except AllocatorError as exc:
            err_console.print(f"ERROR: {exc}", markup=False)
            raise typer.Exit(1) from None
    setup_logging("+".join(chosen), cfg.log.level, cfg.log.format, cfg.log.output, route_stderr=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        asyncio.run(_run_services(cfg, chosen, ready_file))
    except (JoinError, ConfigError, OSError) as exc:
        log.error(str(exc))
        stop_stderr_routing()  # the one line for the person who started it, not a log record
        err_console.print(f"ERROR: {exc}", markup=False)
        raise typer.Exit(1) from None


async def _run_services(cfg, chosen: list[str], ready_file: Path | None) -> None:
    from services.auth.service import run_auth
    from services.common.grpcserver import install_signal_handlers
    from services.common.telemetry import shutdown
    from services.dbproxy.server import run_dbproxy
    from services.discovery.server import run_discovery

    runners = {"auth": run_auth, "discovery": run_discovery, "dbproxy": run_dbproxy}
    stop = asyncio.Event()
    install_signal_handlers(stop)
    ready: dict = {}
    probe = None
    if cfg.health_listen_addr:
        from services.common.healthport import HealthPort

        probe = HealthPort(chosen)
        ready["health_port"] = await probe.start(cfg.health_listen_addr)

    def on_ready(info: dict) -> None:
        ready[info["service"]] = info
        if probe is not None:
            asyncio.get_running_loop().create_task(probe.service_ready(info["service"]))
        if ready_file and set(ready) >= set(chosen):
            write_private(ready_file, json.dumps(ready).encode())

    tasks = []
    for name in chosen:  # auth first: the others may join it
        tasks.append(asyncio.create_task(runners[name](cfg, stop, on_ready), name=name))
        if name == "auth":
            while "auth" not in ready and not tasks[-1].done():
                await asyncio.sleep(0.05)
    if probe is not None:
        async def not_serving_on_stop() -> None:
            await stop.wait()
            await probe.stopping()

        tasks.append(asyncio.create_task(not_serving_on_stop(), name="health"))
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    if probe is not None:
        await probe.stop()
    shutdown()
    for t in done:
        if t.exception():
            raise t.exception()


@app.command()
def health(
    addr: str = typer.Option("127.0.0.1:3090", "--addr", help="host:port of the health port (health_listen_addr)."),
    service: str = typer.Option("", "--service", help="One service's status (auth, discovery, dbproxy); default: the process."),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the answer."),
):
    """Ask a process's plaintext health port whether it serves (exit 0 when SERVING): for
    compose healthchecks and scripts. Kubelet probes call the same port with grpc probes."""
    from services.common.healthport import check

    try:
        status = asyncio.run(check(addr, service, timeout))
    except grpc.aio.AioRpcError as exc:
        err_console.print(f"ERROR: health check of {addr} failed: {exc.code().name}: {exc.details()}", markup=False)
        raise typer.Exit(1) from None
    print(status)
    raise typer.Exit(0 if status == "SERVING" else 1)


# --- the local dev cluster ---------------------------------------------------------------

DEV_PORTS = {"auth": 3025, "join": 3026, "discovery": 3027, "proxy": 3080, "redis": 3081, "api": 3082, "web": 3443,
             "azure": 3444, "redis_db": 6380, "redis_enterprise": 10000}
DEV_USER_ROLES = "access,editor"


class DevCluster:
    def __init__(self, home: Path, free_ports: bool):
        from services.cli.devenv import DevAzure  # not imported by `start`: the stand-in is a fifth of its start-up

        self.home = home
        self.free = free_ports
        self.procs: dict[str, subprocess.Popen] = {}
        self.data = home / "data"
        self.run_dir = home / "run"
        self.logs = home / "logs"
        self.azure = DevAzure(home, self.logs, None if free_ports else DEV_PORTS)
        self.extra_env: dict[str, dict] = {}

    def port(self, name: str) -> int:
        return 0 if self.free else DEV_PORTS[name]

    def write_config(self, name: str, data: dict) -> Path:
        path = self.home / f"{name}.yaml"
        write_private(path, yaml.safe_dump(data, sort_keys=False).encode())
        return path

    def base(self) -> dict:
        return {"version": "v1", "data_dir": str(self.data),
                "log": {"level": "info", "format": "json", "output": ""}}

    def spawn(self, name: str, config: Path) -> dict:
        ready = self.run_dir / f"{name}.json"
        ready.unlink(missing_ok=True)
        logf = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (kept open for the child)
        cmd = [sys.executable, "-m", "services.cli.daemon", "start", "-c", str(config), "--ready-file", str(ready)]
        env = dict(os.environ, **self.extra_env.get(name, {}))
        self.procs[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ready.exists():
                return json.loads(ready.read_text())[name]
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.1)
        tail = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise CLIError(f"{name} did not start; see {self.logs / (name + '.log')}:\n  " + "\n  ".join(tail))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        self.azure.stop()

    def login_dev_user(self, info: dict) -> str:
        """A user for this machine's account, logged in with cgate like anyone else (its password
        is kept in the dev folder, 0600), so `cgate db connect` works right away."""
        from cachegate.auth.v1 import user_service_pb2
        from cachegate.types.v1 import types_pb2
        from services.common.authclient import AuthClient

        name = re.sub(r"[^a-z0-9._-]", "", getpass.getuser().lower()) or "developer"
        if name in ("root", "cachegate-admin"):
            name = "developer"
        pw_file = self.home / "dev-user.password"
        password = pw_file.read_text().strip() if pw_file.exists() else secrets.token_urlsafe(18)
        write_private(pw_file, password.encode())
        base = [sys.executable, "-m", "services.cli.cgate", "login", f"--proxy={info['proxy']}",
                f"--ca-pin={info['ca_pin']}", "--password-stdin"]
        attempt = subprocess.run(base + [f"--user={name}"], input=password + "\n", capture_output=True, text=True,
                                 timeout=60)
        if attempt.returncode == 0:
            return name

        async def invite() -> str:
            async with AuthClient(info["auth_server"], Creds.from_identity_file(info["admin_identity"])) as c:
                try:
                    r = await c.users.CreateUser(user_service_pb2.CreateUserRequest(user=types_pb2.User(
                        name=name, roles=DEV_USER_ROLES.split(","), db_users=["default"],
                        db_names=[str(i) for i in range(16)])), timeout=15)
                    return r.invite.token
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise CLIError(f"could not create the dev user: {exc.details()}") from None
                r = await c.users.ResetUser(user_service_pb2.ResetUserRequest(name=name), timeout=15)
                return r.invite.token

        token = asyncio.run(invite())
        res = subprocess.run(base + [f"--invite={token}"], input=password + "\n", capture_output=True, text=True,
                             timeout=60)
        if res.returncode != 0:
            raise CLIError(f"could not log the dev user in: {res.stderr.strip()}")
        return name

    def wait_for_database(self, admin_identity: str, auth_port: int, name: str, timeout: float) -> None:
        """Discovery finds the stand-in's cache within a poll or two; wait so the guide works at once."""
        from cachegate.auth.v1 import database_service_pb2
        from services.common.authclient import AuthClient

        async def go() -> bool:
            async with AuthClient(f"127.0.0.1:{auth_port}", Creds.from_identity_file(admin_identity)) as c:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        await c.databases.GetDatabase(database_service_pb2.GetDatabaseRequest(name=name), timeout=5)
                        return True
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.5)
            return False

        if not asyncio.run(go()):
            raise CLIError(f"discovery did not publish {name} within {timeout:g}s; see {self.logs / 'discovery.log'}")

    def token_for(self, admin_identity: str, auth_port: int, type_: str) -> tuple[str, str]:
        from cachegate.auth.v1 import token_service_pb2
        from services.common.authclient import AuthClient
        from services.common import identity as idmod

        async def go():
            async with AuthClient(f"127.0.0.1:{auth_port}", Creds.from_identity_file(admin_identity)) as c:
                r = await c.tokens.CreateToken(token_service_pb2.CreateTokenRequest(
                    roles=idmod.TOKEN_TYPES[type_]), timeout=15)
                return r.token, r.ca_pin

        return asyncio.run(go())

    def up(self) -> dict:
        from services.cli.devenv import DEV_DB, DEV_ENTERPRISE_DB, DEV_ENTRA_DB

        for d in (self.data, self.run_dir, self.logs):
            private_dir(d)
        self.azure.start()
        azure_env = self.azure.env()
        self.extra_env = {"discovery": azure_env, "dbproxy": azure_env}
        auth_cfg = dict(self.base(), auth_service={
            "enabled": True, "cluster_name": "cachegate-dev",
            "listen_addr": f"127.0.0.1:{self.port('auth')}", "join_listen_addr": f"127.0.0.1:{self.port('join')}"})
        auth = self.spawn("auth", self.write_config("auth", auth_cfg))
        auth_addr, join_addr = f"127.0.0.1:{auth['mesh_port']}", f"127.0.0.1:{auth['join_port']}"
        started = {"auth": auth}
        for name, type_, section in (("discovery", "discovery", {
                "enabled": True, "listen_addr": f"127.0.0.1:{self.port('discovery')}",
                **self.azure.discovery_section()}),
                ("dbproxy", "proxy", {
                    "enabled": True, "listen_addr": f"127.0.0.1:{self.port('proxy')}",
                    "api_listen_addr": f"127.0.0.1:{self.port('api')}",
                    "redis_listen_addr": f"127.0.0.1:{self.port('redis')}",
                    "web_listen_addr": f"127.0.0.1:{self.port('web')}", **self.azure.dbproxy_section()})):
            join = {"token": "", "ca_pin": auth["ca_pin"]}
            if Creds.load_dir(self.data / name) is None:
                token, _ = self.token_for(auth["admin_identity"], auth["mesh_port"], type_)
                token_file = self.run_dir / f"{name}.token"
                write_private(token_file, token.encode())
                join["token"] = str(token_file)
            cfg = dict(self.base(), auth_server=auth_addr, join_server=join_addr, join=join,
                       **{f"{name}_service": section})
            started[name] = self.spawn(name, self.write_config(name, cfg))
        self.started = started
        proxy = started["dbproxy"]
        info = {
            "cluster_name": auth["cluster_name"], "ca_pin": auth["ca_pin"],
            "auth_server": auth_addr, "join_server": join_addr, "admin_identity": auth["admin_identity"],
            "proxy": f"127.0.0.1:{proxy['public_port']}", "proxy_api": f"127.0.0.1:{proxy['api_port']}",
            "web": f"127.0.0.1:{proxy['web_port']}", "discovery": f"127.0.0.1:{started['discovery']['port']}",
            "host_ca": str(self.data / "dbproxy" / "host_ca.pem"),
            "redis": f"127.0.0.1:{proxy['redis_port']}", "azure": self.azure.info.get("base_url", ""),
            "pids": {n: p.pid for n, p in self.procs.items()} | {n: p.pid for n, p in self.azure.procs.items()},
        }
        info["user"] = self.login_dev_user(info)
        self.wait_for_database(auth["admin_identity"], auth["mesh_port"], DEV_DB, 60)
        self.wait_for_database(auth["admin_identity"], auth["mesh_port"], DEV_ENTRA_DB, 60)
        self.wait_for_database(auth["admin_identity"], auth["mesh_port"], DEV_ENTERPRISE_DB, 60)
        write_private(self.home / "cluster.json", json.dumps(info, indent=2).encode())
        return info


@app.command()
def dev(
    free_ports: bool = typer.Option(False, "--free-ports", help="Bind every port to a free one (tests)."),
    reset: bool = typer.Option(False, "--reset", help="Forget the dev cluster's state first (CAs, users, data); "
                               "refused while a dev cluster runs."),
):
    """Run the whole cluster on this machine, each service its own process, joined with real
    tokens. A process that dies is started again; one dev cluster per CACHEGATE_HOME."""
    from services.cli.supervisor import LOCK_NAME, AlreadyRunning, DevLock, Supervisor, dev_units
    from services.cli.devenv import DEV_DB, DEV_ENTERPRISE_DB, DEV_ENTRA_DB

    home = dev_dir()
    private_dir(home)
    lock = DevLock(home)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        if exc.pid is None:
            msg = (f"processes of an earlier dev cluster are still running ({exc.why}, state in {home}): "
                   f"stop them (kill {exc.why.split('pids ', 1)[-1]}), then run `cachegate dev` again")
        elif reset:
            msg = (f"a dev cluster is running (pid {exc.pid}, state in {home}): stop it first (Ctrl-C in its "
                   f"terminal, or kill {exc.pid}), then run `cachegate dev --reset`")
        else:
            msg = (f"a dev cluster is already running (pid {exc.pid}, state in {home}): use it (`cgate db ls`), "
                   f"or stop it (Ctrl-C in its terminal, or kill {exc.pid})")
        err_console.print(f"ERROR: {msg}", markup=False)
        raise typer.Exit(1) from None
    if reset:
        for entry in home.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    cluster = DevCluster(home, free_ports)

    def all_pids() -> list[int]:
        return [p.pid for p in list(cluster.procs.values()) + list(cluster.azure.procs.values())]

    try:
        info = cluster.up()
    except CLIError as exc:
        cluster.stop()
        err_console.print(f"ERROR: {exc}", markup=False)
        raise typer.Exit(1) from None
    except BaseException:
        cluster.stop()
        raise
    lock.write(all_pids())
    out_console.print(
        f"""Cachegate dev cluster "{info['cluster_name']}" is running (state in {home}).

  auth       {info['auth_server']}   (join port {info['join_server']})
  discovery  {info['discovery']}
  dbproxy    {info['proxy']}   (API {info['proxy_api']}, web https://{info['web']})
  CA pin     {info['ca_pin']}
  logs       {cluster.logs}/

  Azure      {info['azure']}   (local stand-in: publishes {DEV_DB} (access key) and {DEV_ENTRA_DB} (Entra ID), one TLS redis-server,
             and {DEV_ENTERPRISE_DB}, Azure Managed Redis with the OSS cluster policy: a local Redis Cluster of 3 primaries)
  you        logged in as "{info['user']}" (roles {DEV_USER_ROLES})

Next, in another terminal:
  . .venv/bin/activate
  cgate status
  cgate db ls
  cgate db connect {DEV_DB}        # redis-cli through the proxy; no password typed
  cgate db connect {DEV_ENTRA_DB}  # the same through Entra ID: the proxy AUTHs with its token
  cgate db connect {DEV_ENTERPRISE_DB}  # a Redis Cluster behind one endpoint: no MOVED, no -c needed
  cgctl status
  curl -s --cacert {info['host_ca']} https://{info['web']}/v1/webapi/find

A process that dies is started again. Press Ctrl-C to stop the cluster.
cluster ready""", markup=False, highlight=False)
    sys.stdout.flush()
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def changed() -> None:
        info["pids"] = sup.pids()
        write_private(home / "cluster.json", json.dumps(info, indent=2).encode())
        lock.write(all_pids())

    sup = Supervisor(lambda line: err_console.print(line, markup=False), on_change=changed)
    dev_units(cluster, cluster.started, sup)
    while not stop["now"]:
        sup.tick()
        time.sleep(0.2)
    cluster.stop()
    (home / "cluster.json").unlink(missing_ok=True)
    lock.write([])
    lock.release()
    out_console.print("dev cluster stopped")
    raise typer.Exit(0)


def main() -> None:
    app()


def _service_main(name: str) -> None:
    """``cachegate-<service> [options of start]``: ``cachegate start -c $CACHEGATE_CONFIG
    --service <service>``, the entrypoint of one container or unit per service (without the
    variable: the host's config, /etc/cachegate.yaml or $CACHEGATE_SYSTEM_CONFIG)."""
    from services.common.config import system_config_path

    config = os.environ.get("CACHEGATE_CONFIG") or str(system_config_path())
    sys.argv = [f"cachegate-{name}", "start", "-c", config, "--service", name, *sys.argv[1:]]
    app()


def main_auth() -> None:
    _service_main("auth")


def main_discovery() -> None:
    _service_main("discovery")


def main_dbproxy() -> None:
    _service_main("dbproxy")


if __name__ == "__main__":
    main()
