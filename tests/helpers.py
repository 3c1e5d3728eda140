"""Test helpers: start real service processes, talk to them with real clients."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PEM_BLOCK = re.compile(rb"-----BEGIN [A-Z ]+-----\r?\n.*?-----END [A-Z ]+-----\r?\n", re.S)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed: run `make test` (it installs everything)")
    return found


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    # The machine's /etc/cachegate.yaml is none of the tests' business.
    e.setdefault("CACHEGATE_SYSTEM_CONFIG", str(REPO / "tests" / "no-such-system-config.yaml"))
    # The test suite's own switch, not a config key (CACHEGATE_* variables override config).
    e.pop("CACHEGATE_RELIABILITY", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


@dataclass
class Proc:
    name: str
    config: Path
    ready_file: Path
    log: Path
    popen: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    extra_env: dict = field(default_factory=dict)
    # Put before the command (e.g. ``unshare -m ...`` to run the service in its own mount namespace).
    prefix: list = field(default_factory=list)

    def start(self, timeout: float = 60, extra_args: list[str] | None = None, expect_fail: bool = False) -> "Proc":
        self.ready_file.unlink(missing_ok=True)
        logf = open(self.log, "ab")  # noqa: SIM115
        cmd = [*self.prefix, sys.executable, "-m", "services.cli.daemon", "start", "-c", str(self.config),
               "--ready-file", str(self.ready_file), *(extra_args or [])]
        self.popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env(**self.extra_env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())[self.name]
                return self
            if self.popen.poll() is not None:
                if expect_fail:
                    return self
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Cluster:
    """Auth (and optionally discovery, dbproxy) as separate processes on free ports."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.procs: dict[str, Proc] = {}

    def base(self, **kw) -> dict:
        return {"version": "v1", "data_dir": str(self.data), "log": {"level": "debug", "format": "json"}, **kw}

    def proc(self, name: str, cfg: dict, tag: str | None = None) -> Proc:
        tag = tag or name
        p = Proc(name, write_yaml(self.root / f"{tag}.yaml", cfg), self.root / f"{tag}.ready.json",
                 self.root / f"{tag}.log")
        self.procs[tag] = p
        return p

    def start_auth(self, **auth_kw) -> Proc:
        cfg = self.base(auth_service={"enabled": True, "cluster_name": "test-cluster",
                                      "listen_addr": "127.0.0.1:0", "join_listen_addr": "127.0.0.1:0", **auth_kw})
        return self.proc("auth", cfg).start()

    @property
    def auth(self) -> Proc:
        return self.procs["auth"]

    @property
    def auth_addr(self) -> str:
        return f"127.0.0.1:{self.auth.info['mesh_port']}"

    @property
    def join_addr(self) -> str:
        return f"127.0.0.1:{self.auth.info['join_port']}"

    @property
    def admin_identity(self) -> str:
        return self.auth.info["admin_identity"]

    @property
    def ca_pin(self) -> str:
        return self.auth.info["ca_pin"]

    def joiner_config(self, service: str, token: str, data_dir: Path | None = None, ca_pin: str | None = None,
                      **section) -> dict:
        listen = {"discovery": {"listen_addr": "127.0.0.1:0"},
                  "dbproxy": {"listen_addr": "127.0.0.1:0", "api_listen_addr": "127.0.0.1:0",
                              "redis_listen_addr": "127.0.0.1:0", "web_listen_addr": "127.0.0.1:0"}}[service]
        cfg = self.base(auth_server=self.auth_addr, join_server=self.join_addr,
                        join={"token": token, "ca_pin": ca_pin if ca_pin is not None else self.ca_pin},
                        **{f"{service}_service": {"enabled": True, **listen, **section}})
        if data_dir:
            cfg["data_dir"] = str(data_dir)
        return cfg

    def start_joiner(self, service: str, token: str, tag: str | None = None, extra_env: dict | None = None,
                     **kw) -> Proc:
        p = self.proc(service, self.joiner_config(service, token, **kw), tag)
        p.extra_env = extra_env or {}
        return p.start()

    def cgctl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return run_cli("cgctl", "--auth-server", self.auth_addr, "-i", self.admin_identity, *args,
                       check=check, input=input)

    def token(self, type_: str = "db", *extra: str) -> str:
        return self.cgctl("tokens", "add", f"--type={type_}", *extra).stdout.strip()

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


def run_cli(name: str, *args: str, check: bool = True, input: str | None = None, timeout: float = 60,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([tool(name), *args], capture_output=True, text=True, input=input, timeout=timeout,
                         env=env(**(extra_env or {})), cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def split_identity(identity_file: str, folder: Path) -> tuple[str, str, str]:
    """Split an identity file into cert, key, CA files (for grpcurl/curl)."""
    blocks = PEM_BLOCK.findall(Path(identity_file).read_bytes())
    folder.mkdir(parents=True, exist_ok=True)
    names = ("id.crt", "id.key", "ca.pem")
    for name, blk in zip(names, blocks):
        (folder / name).write_bytes(blk)
    return tuple(str(folder / n) for n in names)  # type: ignore[return-value]


def grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([tool("grpcurl"), "-max-time", "20", *args], capture_output=True, text=True,
                          timeout=timeout, env=env())
