"""`cachegate dev` as a supervisor: one dev cluster per state folder, and a process of it that
dies is started again (with backoff, each step a line on stderr) while the others keep running.

* :class:`DevLock` holds ``dev.lock`` in the dev folder (``flock``: the kernel lets go when the
  holder dies, so a lock is never stale). A second ``cachegate dev`` sees it held and says so
  in one line before it touches anything: no CA, redis.conf or state.yaml is rewritten.
* :class:`Supervisor` watches named processes; ``tick()`` restarts the dead ones. A unit that
  dies again soon after a restart waits twice as long before the next (0.5 s up to 30 s); one
  that ran for a minute starts again at 0.5 s.
* :func:`dev_units` is the hook: what to restart for each process of a running
  :class:`~services.cli.daemon.DevCluster` (the services with their own config, pinned to the
  ports they bound; the redis-server with its redis.conf; the Azure stand-in with its state and
  port).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import yaml

from services.cli.common import CLIError

LOCK_NAME = "dev.lock"


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None, why: str = "running"):
        super().__init__(pid)
        self.pid = pid
        self.why = why


def _alive_of_ours(pid: int, home: Path) -> bool:
    """Whether ``pid`` still runs and is one of a dev cluster's processes (its command line names
    the dev folder, or it is a redis-server), so a reused pid is never mistaken for one."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(home) in cmdline or "redis-server" in cmdline


class DevLock:
    """``dev.lock`` in the dev folder, held for as long as a ``cachegate dev`` runs. It also
    lists the cluster's pids, so a later run can tell when an earlier one was killed hard and
    left its processes behind (they hold the ports and the state)."""

    def __init__(self, home: Path):
        self.home = home
        self.path = home / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._read().get("pid")
            os.close(fd)
            raise AlreadyRunning(pid) from None
        self.fd = fd
        left = [p for p in self._read().get("pids", []) if _alive_of_ours(p, self.home)]
        if left:
            self.release()
            raise AlreadyRunning(None, "left behind: pids " + " ".join(map(str, left)))
        self.write([])

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def write(self, pids: list[int]) -> None:
        if self.fd is None:
            return
        data = json.dumps({"pid": os.getpid(), "pids": sorted(pids)}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing lets go of the flock
            self.fd = None


@dataclass
class Unit:
    name: str
    proc: subprocess.Popen
    start: Callable[[], subprocess.Popen]
    log: Path
    started: float = field(default_factory=time.monotonic)
    delay: float = 0.0
    due: float | None = None  # when the next start is due, while the unit is down
    restarts: int = 0


class Supervisor:
    """Restarts dead processes with backoff; ``say`` gets one line per event."""

    def __init__(self, say: Callable[[str], None], first: float = 0.5, cap: float = 30.0,
                 healthy_after: float = 60.0, on_change: Callable[[], None] | None = None):
        self.say = say
        self.first, self.cap, self.healthy_after = first, cap, healthy_after
        self.on_change = on_change or (lambda: None)
        self.units: dict[str, Unit] = {}

    def add(self, name: str, proc: subprocess.Popen, start: Callable[[], subprocess.Popen], log: Path) -> None:
        self.units[name] = Unit(name, proc, start, log)

    def pids(self) -> dict[str, int]:
        return {u.name: u.proc.pid for u in self.units.values()}

    def _schedule(self, u: Unit, now: float) -> None:
        ran = now - u.started
        u.delay = self.first if ran >= self.healthy_after or not u.delay else min(u.delay * 2, self.cap)
        u.due = now + u.delay

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for u in self.units.values():
            if u.due is None:
                code = u.proc.poll()
                if code is None:
                    continue
                self._schedule(u, now)
                self.say(f"{u.name} exited (code {code}); restarting it in {u.delay:g}s (log: {u.log})")
            if u.due is not None and now >= u.due:
                self._restart(u)
                now = time.monotonic()

    def _restart(self, u: Unit) -> None:
        u.restarts += 1
        u.started = time.monotonic()
        try:
            u.proc = u.start()
        except (CLIError, RuntimeError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._schedule(u, time.monotonic())
            self.say(f"{u.name} did not start again ({first}); next try in {u.delay:g}s (log: {u.log})")
            return
        u.due = None
        self.say(f"{u.name} is running again (pid {u.proc.pid}, restart {u.restarts})")
        self.on_change()


# --- the hook for `cachegate dev` ---------------------------------------------------------

def _pin(config: Path, section: str, ports: dict[str, int]) -> None:
    """Write the ports a service bound into its config, so a restart binds the same ones
    (with --free-ports the config says 0) and the others find it where it was."""
    data = yaml.safe_load(config.read_text())
    sec = data[section]
    for key, port in ports.items():
        host = sec[key].rsplit(":", 1)[0]
        sec[key] = f"{host}:{port}"
    from services.common.creds import write_private

    write_private(config, yaml.safe_dump(data, sort_keys=False).encode())


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 20) -> None:
    from services.cli.devenv import _wait_port as wait

    wait(port, proc, what, log, timeout)


def dev_units(cluster, started: dict[str, dict], sup: Supervisor) -> None:
    """Register every process of a cluster that is up (``started`` holds the ready info of
    auth, discovery and dbproxy) with ``sup``: how each is started again."""
    home: Path = cluster.home
    pinned = {"auth": ("auth_service", {"listen_addr": "mesh_port", "join_listen_addr": "join_port"}),
              "discovery": ("discovery_service", {"listen_addr": "port"}),
              "dbproxy": ("dbproxy_service", {"listen_addr": "public_port", "api_listen_addr": "api_port",
                                              "redis_listen_addr": "redis_port", "web_listen_addr": "web_port"})}
    for name, (section, keys) in pinned.items():
        config = home / f"{name}.yaml"
        _pin(config, section, {k: started[name][v] for k, v in keys.items()})

        def again(name=name, config=config) -> subprocess.Popen:
            cluster.spawn(name, config)
            return cluster.procs[name]

        sup.add(name, cluster.procs[name], again, cluster.logs / f"{name}.log")

    azure = cluster.azure

    def redis_again() -> subprocess.Popen:
        log = cluster.logs / "redis-server.log"
        proc = subprocess.Popen(["redis-server", str(azure.dir / "redis.conf")], stdout=open(log, "ab"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, start_new_session=True)
        azure.procs["redis-server"] = proc
        _wait_port(azure.info["redis_port"], proc, "redis-server", log)
        return proc

    def standin_again() -> subprocess.Popen:
        from services.azure_standin import dev as standin_dev

        port = urlsplit(azure.info["base_url"]).port or 0
        proc, _ = standin_dev.start_process(azure.dir, azure.dir / "state.yaml", timeout=30,
                                            log_file=cluster.logs / "azure-standin.log", port=port, keep=True)
        azure.procs["azure-standin"] = proc
        return proc

    sup.add("redis-server", azure.procs["redis-server"], redis_again, cluster.logs / "redis-server.log")
    sup.add("azure-standin", azure.procs["azure-standin"], standin_again, cluster.logs / "azure-standin.log")
