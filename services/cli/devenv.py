"""What `cachegate dev` runs beside the cluster so that the guide works on one machine:

* a local ``redis-server`` with TLS (a dev CA) and a password, like Azure's port 6380;
* the local Azure stand-in (Resource Manager and Entra ID over HTTPS) that publishes it
  as the cache ``my-azure-redis``, whose access key is that password, and as
  ``my-azure-redis-entra``, a cache with access keys disabled reached through Entra ID (the
  stand-in keeps an ACL user per principal on the redis-server, whose passwords are the
  principal's current tokens, and ends connections whose token expired, as Azure does);
* a small local Redis Cluster (3 primaries, TLS, the cluster bus on TLS too) that the stand-in
  publishes as the Azure Managed Redis database ``my-azure-redis-enterprise`` with Azure's
  default OSSCluster policy, whose access key is its password;
* the settings discovery and dbproxy need to use the real Azure SDK against the stand-in.

Everything listens on 127.0.0.1; state lives in ``$CACHEGATE_HOME/dev``.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import yaml

from services.azure_standin import dev as standin_dev
from services.cli.common import CLIError
from services.cli.devcluster import LocalCluster, stop_processes
from services.common import pki
from services.common.creds import private_dir, write_private

DEV_DB = "my-azure-redis"
DEV_ENTRA_DB = "my-azure-redis-entra"
DEV_ENTERPRISE_DB = "my-azure-redis-enterprise"
SUBSCRIPTION = "11111111-2222-3333-4444-555555555555"
TENANT = "72f9aa00-0000-4000-8000-00000000c0de"
CLIENT_ID = "0d1c5c2e-0000-4000-8000-000000000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    raise CLIError(f"{what} did not start; see {log}:\n  " + "\n  ".join(tail))


class DevAzure:
    def __init__(self, home: Path, logs: Path, fixed_ports: dict[str, int] | None):
        self.dir = home / "azure"
        self.logs = logs
        self.fixed = fixed_ports
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict = {}
        self.cluster: LocalCluster | None = None

    # --- files --------------------------------------------------------------------------------
    def _secrets(self) -> dict:
        path = self.dir / "secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        data = {"primary": secrets.token_urlsafe(32), "secondary": secrets.token_urlsafe(32),
                "client_secret": secrets.token_urlsafe(24)}
        write_private(path, json.dumps(data).encode())
        return data

    def _enterprise_secrets(self) -> dict:
        path = self.dir / "enterprise-secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        data = {"primary": secrets.token_urlsafe(32), "secondary": secrets.token_urlsafe(32)}
        write_private(path, json.dumps(data).encode())
        return data

    def _pki(self) -> Path:
        """A dev CA and a redis-server certificate for localhost/127.0.0.1 (made once)."""
        ca_file = self.dir / "redis-ca.pem"
        if ca_file.exists() and (self.dir / "redis.crt").exists():
            return ca_file
        ca = pki.CertAuthority.create("Cachegate dev Redis CA", "cachegate-dev")
        key = pki.new_key()
        cert = ca.sign(key.public_key(), "localhost", None, dt.timedelta(days=365), ips=["127.0.0.1", "::1"],
                       dns_names=["localhost"], server=True)
        write_private(self.dir / "redis.key", pki.key_to_pem(key))
        write_private(self.dir / "redis.crt", pki.cert_to_pem(cert))
        write_private(ca_file, ca.cert_pem)
        return ca_file

    # --- processes ------------------------------------------------------------------------------
    def start(self) -> dict:
        if not shutil.which("redis-server"):
            raise CLIError("redis-server is not installed: run `make dev` (it installs it) or "
                           "`apt-get install redis-server`")
        private_dir(self.dir)
        keys = self._secrets()
        ca_file = self._pki()
        redis_port = (self.fixed or {}).get("redis_db") or free_port()
        rlog = self.logs / "redis-server.log"
        # The password goes in through stdin-free config: a 0600 file redis-server reads, never argv.
        conf = self.dir / "redis.conf"
        write_private(conf, "\n".join([
            "bind 127.0.0.1", "port 0", f"tls-port {redis_port}", f"tls-cert-file {self.dir / 'redis.crt'}",
            f"tls-key-file {self.dir / 'redis.key'}", f"tls-ca-cert-file {ca_file}", "tls-auth-clients no",
            f"requirepass {keys['primary']}", 'save ""', "appendonly no", f"dir {self.dir}", "databases 16", "",
        ]).encode())
        self.procs["redis-server"] = subprocess.Popen(
            ["redis-server", str(conf)], stdout=open(rlog, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        _wait_port(redis_port, self.procs["redis-server"], "redis-server", rlog)

        # Azure Managed Redis with the OSS cluster policy: a real Redis Cluster, 3 primaries.
        ent_keys = self._enterprise_secrets()
        first = (self.fixed or {}).get("redis_enterprise")
        self.cluster = LocalCluster(self.dir / "enterprise", cert=self.dir / "redis.crt", key=self.dir / "redis.key",
                                    ca=ca_file, password=ent_keys["primary"], log_dir=self.logs,
                                    ports=[first, first + 1, first + 2] if first else None)
        try:
            self.cluster.start()
        except RuntimeError as exc:
            raise CLIError(f"the local Redis Cluster ({DEV_ENTERPRISE_DB}) did not start: {exc}") from None

        state = {
            "tenant": TENANT, "page_size": 100,
            "subscriptions": [{"id": SUBSCRIPTION, "display_name": "Cachegate dev"}],
            "client_credentials": [{"client_id": CLIENT_ID, "client_secret": keys["client_secret"],
                                    "object_id": "5f0a4e7c-0000-4000-8000-0000000000a1"}],
            "caches": [{
                "name": DEV_DB, "subscription": SUBSCRIPTION, "resourceGroup": "dev-rg", "location": "East US",
                "tags": {"env": "dev"}, "provisioningState": "Succeeded", "hostName": "localhost",
                "sslPort": redis_port, "enableNonSslPort": False, "redisVersion": "7.0",
                "sku": {"name": "Standard", "family": "C", "capacity": 1},
                "keys": {"primary": keys["primary"], "secondary": keys["secondary"]},
            }, {
                "name": DEV_ENTRA_DB, "subscription": SUBSCRIPTION, "resourceGroup": "dev-rg",
                "location": "East US", "tags": {"env": "dev"}, "provisioningState": "Succeeded",
                "hostName": "localhost", "sslPort": redis_port, "enableNonSslPort": False, "redisVersion": "7.0",
                "sku": {"name": "Standard", "family": "C", "capacity": 1},
                "disableAccessKeyAuthentication": True,
            }],
            "enterprise_clusters": [{
                "name": DEV_ENTERPRISE_DB, "subscription": SUBSCRIPTION, "resourceGroup": "dev-rg",
                "location": "East US", "tags": {"env": "dev"}, "hostName": "localhost",
                "databases": [{"name": "default", "port": self.cluster.ports[0], "clusteringPolicy": "OSSCluster",
                               "keys": {"primary": ent_keys["primary"], "secondary": ent_keys["secondary"]}}],
            }],
            # The data plane of the Entra ID cache: the stand-in administers the redis-server
            # with its default user's password (the access key of my-azure-redis).
            "entra_redis": {"servers": [{"host": "127.0.0.1", "port": redis_port, "tls": True,
                                         "ca_file": str(ca_file), "password": keys["primary"]}]},
        }
        state_file = self.dir / "state.yaml"
        write_private(state_file, yaml.safe_dump(state, sort_keys=False).encode())
        try:
            proc, info = standin_dev.start_process(self.dir, state_file, timeout=30,
                                                   log_file=self.logs / "azure-standin.log",
                                                   port=(self.fixed or {}).get("azure") or 0, keep=True)
        except RuntimeError as exc:
            raise CLIError(str(exc)) from None
        self.procs["azure-standin"] = proc
        self.info = info | {"redis_port": redis_port, "redis_ca": str(ca_file),
                            "enterprise_ports": list(self.cluster.ports)}
        return self.info

    def endpoints(self) -> dict:
        return standin_dev.endpoints(self.info)

    def env(self) -> dict:
        """The service principal discovery and dbproxy sign in with (DefaultAzureCredential)."""
        return standin_dev.credential_env(self.info)

    def discovery_section(self) -> dict:
        return {"poll_interval": "10s", "azure_endpoints": self.endpoints(),
                "azure": [{"types": ["redis"], "regions": ["*"], "subscriptions": ["*"],
                           "resource_groups": ["*"], "tags": {"*": "*"}}]}

    def dbproxy_section(self) -> dict:
        return {"azure_endpoints": self.endpoints(), "database_ca_files": [self.info["redis_ca"]]}

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        stop_processes(self.procs.values())
