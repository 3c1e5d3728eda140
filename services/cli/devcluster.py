"""A small local Redis Cluster with TLS and a password, for `cachegate dev` and the tests.

Each node is a ``redis-server --cluster-enabled yes`` with ``tls-cluster yes`` (the cluster
bus is TLS too, on port + 10000) and ``requirepass``/``masterauth`` in a 0600 config file
(the password is never on a command line); ``redis-cli --cluster create`` joins them, with
the password in ``REDISCLI_AUTH``. :meth:`LocalCluster.add_replica` adds a replica to a
primary (for failover tests).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.common.creds import private_dir, write_private

__all__ = ["LocalCluster", "free_cluster_port", "stop_processes"]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A port whose bus port (+10000) is free too."""
    taken = taken or set()
    for _ in range(200):
        port = random.randint(20000, 40000)
        if port not in taken and port + 10000 not in taken and _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    def __init__(self, folder: Path, *, cert: Path, key: Path, ca: Path, password: str,
                 primaries: int = 3, node_timeout_ms: int = 2000, log_dir: Path | None = None,
                 ports: list[int] | None = None) -> None:
        self.dir = folder
        self.cert, self.key, self.ca = cert, key, ca
        self.password = password
        self.primaries = primaries
        self.node_timeout_ms = node_timeout_ms
        self.log_dir = log_dir or folder
        self.procs: dict[int, subprocess.Popen] = {}
        self.ports: list[int] = []
        self._fixed = list(ports or [])

    # -- nodes ------------------------------------------------------------------------------

    def _start_node(self, port: int) -> None:
        d = self.dir / f"node-{port}"
        private_dir(d)
        (d / "nodes.conf").unlink(missing_ok=True)  # a new cluster each start
        conf = d / "redis.conf"
        write_private(conf, "\n".join([
            "bind 127.0.0.1", "port 0", f"tls-port {port}", f"tls-cert-file {self.cert}",
            f"tls-key-file {self.key}", f"tls-ca-cert-file {self.ca}", "tls-auth-clients no",
            "tls-cluster yes", "tls-replication yes", "cluster-enabled yes",
            f"cluster-config-file {d / 'nodes.conf'}", f"cluster-node-timeout {self.node_timeout_ms}",
            f"requirepass {self.password}", f"masterauth {self.password}", 'save ""', "appendonly no",
            f"dir {d}", "",
        ]).encode())
        log = open(self.log_dir / f"redis-cluster-{port}.log", "ab")  # noqa: SIM115
        self.procs[port] = subprocess.Popen(["redis-server", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} did not start; see {self.log_dir}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {port} did not start in time")

    def cli(self, port: int, *args: str, check: bool = True, timeout: float = 30) -> str:
        """redis-cli against one node (TLS, the password in REDISCLI_AUTH)."""
        env = dict(os.environ, REDISCLI_AUTH=self.password)
        r = subprocess.run(["redis-cli", "--tls", "--cacert", str(self.ca), "-h", "127.0.0.1", "-p", str(port),
                            *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args[:3])} on {port}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def start(self) -> LocalCluster:
        if not shutil.which("redis-server") or not shutil.which("redis-cli"):
            raise RuntimeError("redis-server and redis-cli are needed: apt-get install redis-server redis-tools")
        private_dir(self.dir)
        taken: set[int] = set()
        for i in range(self.primaries):
            port = self._fixed[i] if i < len(self._fixed) else free_cluster_port(taken)
            taken.add(port)
            self._start_node(port)
            self.ports.append(port)
        self.cli(self.ports[0], "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                 "--cluster-replicas", "0", "--cluster-yes")
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [p for p in self.ports if self.procs[p].poll() is None]
            if all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO", check=False) for p in live):
                # Every node knows every slot's owner.
                if all(self.cli(p, "CLUSTER", "SLOTS", check=False).strip() for p in live):
                    return
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")

    def node_id(self, port: int) -> str:
        return self.cli(port, "CLUSTER", "MYID").strip()

    def add_replica(self, primary_port: int) -> int:
        """A new node replicating ``primary_port``; returns its port once in sync."""
        port = free_cluster_port(set(self.ports))
        self._start_node(port)
        self.ports.append(port)
        self.cli(port, "CLUSTER", "MEET", "127.0.0.1", str(primary_port))
        primary = self.node_id(primary_port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if primary in self.cli(port, "CLUSTER", "NODES"):
                out = self.cli(port, "CLUSTER", "REPLICATE", primary, check=False)
                if "OK" in out:
                    break
            time.sleep(0.1)
        while time.monotonic() < deadline:
            info = self.cli(port, "INFO", "replication")
            if "master_link_status:up" in info:
                return port
            time.sleep(0.1)
        raise RuntimeError("the replica did not sync")

    def stop(self) -> None:
        stop_processes(self.procs.values())


def stop_processes(procs) -> None:
    """Terminate, wait up to 10 s each, then kill."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
