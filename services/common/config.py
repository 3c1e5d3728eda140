"""The one YAML config file, a section per service; environment overrides.

Environment variables override file values: ``CACHEGATE_`` followed by the key
path in upper case with ``__`` between levels, e.g.
``CACHEGATE_AUTH_SERVICE__LISTEN_ADDR=0.0.0.0:3025`` or ``CACHEGATE_DATA_DIR``.
Values are read as YAML scalars (``true``, ``30``, ``[a, b]``). An unknown key,
in the file or in a variable, is an error that names it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.durations import format_duration, parse_duration, parse_size  # noqa: F401 (part of this module's API)

ENV_PREFIX = "CACHEGATE_"
# Variables with the prefix that are not config keys.
# Passwords of admin-defined databases (secret: env:CACHEGATE_DB_NAME), read by dbproxy.
ENV_DB_SECRET_PREFIX = "CACHEGATE_DB_"
ENV_NOT_CONFIG = {"CACHEGATE_CONFIG", "CACHEGATE_HOME", "CACHEGATE_IDENTITY", "CACHEGATE_AUTH_SERVER", "CACHEGATE_PROXY",
                  "CACHEGATE_SYSTEM_CONFIG", "CACHEGATE_ALLOCATOR_LOADED"}
# The host's config file (`cachegate db configure create -o file` writes it); the variable
# moves it (tests, containers with a read-only /etc).
SYSTEM_CONFIG_ENV = "CACHEGATE_SYSTEM_CONFIG"
SYSTEM_CONFIG = "/etc/cachegate.yaml"


def system_config_path() -> Path:
    """Where this host's config file lives: $CACHEGATE_SYSTEM_CONFIG, else /etc/cachegate.yaml."""
    return Path(os.environ.get(SYSTEM_CONFIG_ENV) or SYSTEM_CONFIG)

DEFAULT_AUTH_PORT = 3025
DEFAULT_JOIN_PORT = 3026
DEFAULT_DISCOVERY_PORT = 3027
DEFAULT_PROXY_PORT = 3080
DEFAULT_REDIS_PORT = 3081
DEFAULT_API_PORT = 3082
DEFAULT_WEB_PORT = 3443
DEFAULT_HEALTH_PORT = 3090

class ConfigError(ValueError):
    """A config problem, with a one-line message that says what to fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Duration = float


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    # Empty = stderr.
    output: str = ""


class TelemetryConfig(_Model):
    # Traces of gRPC calls and sessions: off (default, nearly free), console or otlp.
    traces: Literal["off", "console", "otlp"] = "off"
    # traces: console writes one JSON object per span, one a line, to this file (empty =
    # stdout); never into the service log.
    traces_output: str = ""
    metrics: Literal["off", "console", "otlp", "prometheus"] = "off"
    # metrics: prometheus serves /metrics here (host:port).
    prometheus_listen_addr: str = "127.0.0.1:9464"
    otlp_endpoint: str = "localhost:4317"
    otlp_insecure: bool = True
    # Fraction of traces kept (1.0 = all).
    sample_ratio: float = 1.0


class JoinParams(_Model):
    # The join token, or a path to a file that holds it.
    token: str = ""
    # "sha256:<hex>" pin of the cluster's host CA (printed by `cgctl tokens add`), or a path
    # to a file that holds it.
    ca_pin: str = ""


class StorageConfig(_Model):
    type: Literal["sqlite", "postgres"] = "sqlite"
    # sqlite: file path (default: <data_dir>/auth/cachegate.db).
    path: str = ""
    # postgres: a libpq connection string.
    conn_string: str = ""


class AuthServiceConfig(_Model):
    enabled: bool = False
    cluster_name: str = ""
    # Mutual-TLS mesh port (services and cgctl).
    listen_addr: str = f"0.0.0.0:{DEFAULT_AUTH_PORT}"
    # Server-TLS port that serves only GetClusterInfo and JoinService.
    join_listen_addr: str = f"0.0.0.0:{DEFAULT_JOIN_PORT}"
    # Extra names/addresses for the auth certificate.
    public_addrs: list[str] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    # Default TTL of join tokens.
    token_ttl: Duration = 1800.0
    # Lifetime of host certificates.
    host_cert_ttl: Duration = 30 * 86400.0
    # User session certificates: TTL when the login asks for none (roles' max_session_ttl caps it).
    session_ttl: Duration = Field(default=12 * 3600.0, gt=0)
    # Lifetime of the one-time invite of `cgctl users add` / `users reset`.
    invite_ttl: Duration = Field(default=3600.0, gt=0)
    # Failed logins: this many failures for one user name within login_lockout lock that name
    # out for login_lockout after the last failure; login_max_attempts_per_addr does the same
    # per client address.
    login_max_attempts: int = Field(default=5, ge=1)
    login_max_attempts_per_addr: int = Field(default=20, ge=1)
    login_lockout: Duration = Field(default=300.0, gt=0)

    _ttl = field_validator("token_ttl", "host_cert_ttl", "session_ttl", "invite_ttl", "login_lockout",
                           mode="before")(parse_duration)


class AzureEndpoints(_Model):
    # Resource Manager base URL (empty = public Azure).
    resource_manager: str = ""
    # Entra ID authority host (empty = public Azure).
    authority_host: str = ""
    # CA bundle to trust for both (empty = system CAs).
    ca_file: str = ""


class AzureMatcherConfig(_Model):
    types: list[str] = Field(default_factory=lambda: ["redis"])
    regions: list[str] = Field(default_factory=lambda: ["*"])
    subscriptions: list[str] = Field(default_factory=lambda: ["*"])
    resource_groups: list[str] = Field(default_factory=lambda: ["*"])
    tags: dict[str, str | list[str]] = Field(default_factory=lambda: {"*": "*"})

    @field_validator("types", "regions", "subscriptions", "resource_groups", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        # "*" or "eastus,westus" as well as a YAML list.
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()] or ["*"]
        return v

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        return {"*": "*"} if v in (None, "*", {}) else v


class StaticDatabaseConfig(_Model):
    name: str
    uri: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    tls: bool = True
    ca_file: str = ""
    # "env:NAME" or "file:/path" holding the database password.
    secret: str = ""
    # "entra": dbproxy signs in with its Entra ID token (AUTH <object id> <token>), no secret.
    auth: str = ""
    # A Redis Cluster (as Azure's OSSCluster policy): dbproxy routes each command by slot.
    cluster: bool = False


class DiscoveryServiceConfig(_Model):
    enabled: bool = False
    listen_addr: str = f"0.0.0.0:{DEFAULT_DISCOVERY_PORT}"
    public_addrs: list[str] = Field(default_factory=list)
    # Seconds between discovery rounds (plus up to 10%, at most 30s, of random jitter).
    poll_interval: Duration = 60.0
    # Hosts with the same group share (and reconcile) the same records: give hosts with
    # different matchers different groups.
    discovery_group: str = "default"
    # Timeout of one Azure request.
    azure_timeout: Duration = 30.0
    # Replicas of one discovery_group: only the holder of the group's lease in auth
    # reconciles. It lasts lease_ttl after each renewal, renewed every lease_renew_interval,
    # so another replica takes over within lease_ttl + lease_renew_interval of the
    # holder's death (docs/ha.md).
    lease_ttl: Duration = 15.0
    lease_renew_interval: Duration = 5.0
    azure: list[AzureMatcherConfig] = Field(default_factory=list)
    azure_endpoints: AzureEndpoints = Field(default_factory=AzureEndpoints)
    static: list[StaticDatabaseConfig] = Field(default_factory=list)

    _poll = field_validator("poll_interval", "azure_timeout", "lease_ttl", "lease_renew_interval",
                            mode="before")(parse_duration)

    @field_validator("lease_ttl")
    @classmethod
    def _lease_ttl(cls, v: float) -> float:
        if not 1 <= v <= 300:
            raise ValueError("lease_ttl must be between 1s and 5m")
        return v

    @field_validator("lease_renew_interval")
    @classmethod
    def _lease_renew(cls, v: float, info) -> float:
        ttl = info.data.get("lease_ttl", 15.0)
        if not 0.2 <= v <= ttl / 2:
            raise ValueError(f"lease_renew_interval must be at least 0.2s and at most half of lease_ttl ({ttl:g}s)")
        return v

    @field_validator("poll_interval")
    @classmethod
    def _min_poll(cls, v: float) -> float:
        if v < 1:
            raise ValueError("poll_interval must be at least 1s")
        return v

    @field_validator("discovery_group")
    @classmethod
    def _group(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v):
            raise ValueError("discovery_group must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("static")
    @classmethod
    def _unique_static(cls, v: list) -> list:
        names = [d.name for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"static database names must be unique: {', '.join(dup)}")
        return v


class LimitsConfig(_Model):
    """Limits of the RESP listener. Unset keys take dbproxy's safe defaults
    (services/dbproxy/limits.py); sizes take 64MiB-style values, durations 10s-style."""

    max_bulk_len: int | str | None = None
    max_array_len: int | None = None
    max_inline_len: int | str | None = None
    max_request: int | str | None = None
    # All sessions together: bytes held for commands not yet complete.
    request_buffer: int | str | None = None
    # A started command must be complete within this.
    request_timeout: Duration | None = None
    tls_handshake_timeout: Duration | None = None
    # TLS handshakes in progress at once.
    max_handshakes: int | None = None
    upstream_connect_timeout: Duration | None = None
    # An idle session gives its database connection back to the pool after this (0: never).
    upstream_idle_release: Duration | None = None
    # On SIGTERM: how long live sessions have to receive the replies already due.
    shutdown_grace: Duration | None = None
    # Sessions per user when their roles set no max_connections.
    sessions_per_user: int | None = None
    # Sessions of the whole proxy.
    max_sessions: int | None = None
    max_reply_line: int | str | None = None
    audit_arg_max: int | None = None
    audit_max_args: int | None = None

    _d = field_validator("tls_handshake_timeout", "upstream_connect_timeout", "request_timeout", "shutdown_grace",
                         "upstream_idle_release", mode="before")(
        lambda v: None if v is None else parse_duration(v))
    _s = field_validator("max_bulk_len", "max_inline_len", "max_request", "request_buffer", "max_reply_line",
                         mode="before")(lambda v: None if v is None else parse_size(v))

    def set_values(self) -> dict:
        return self.model_dump(exclude_none=True)


class DbProxyServiceConfig(_Model):
    enabled: bool = False
    # Public gRPC API for cgate (server TLS; client certificate optional).
    listen_addr: str = f"0.0.0.0:{DEFAULT_PROXY_PORT}"
    # Authenticated gRPC API (mutual TLS with session certificates).
    api_listen_addr: str = f"0.0.0.0:{DEFAULT_API_PORT}"
    # RESP listener (TLS with database certificates).
    redis_listen_addr: str = f"0.0.0.0:{DEFAULT_REDIS_PORT}"
    # HTTPS web port: /v1/webapi/find.
    web_listen_addr: str = f"0.0.0.0:{DEFAULT_WEB_PORT}"
    # A publicly trusted certificate for the web port (default: the host certificate).
    web_cert_file: str = ""
    web_key_file: str = ""
    # host:port users reach the public API on (default: listen_addr).
    public_addr: str = ""
    public_addrs: list[str] = Field(default_factory=list)
    azure_endpoints: AzureEndpoints = Field(default_factory=AzureEndpoints)
    # Extra CA bundles trusted for TLS to databases, beside the system CAs (Azure) and a
    # database's own CA (static databases).
    database_ca_files: list[str] = Field(default_factory=list)
    # Where audit events wait while auth cannot be reached (default: data_dir/dbproxy/audit-spool).
    audit_spool_dir: str = ""
    # Processes that serve the RESP port (SO_REUSEPORT: the kernel spreads new sessions over
    # them), so that one dbproxy uses every core; 0 = one per CPU. The first also serves the
    # gRPC and web ports.
    workers: int = Field(default=1, ge=0, le=64)
    # The memory allocator: auto (jemalloc if libjemalloc.so.2 is installed, else glibc's),
    # jemalloc (refuse to start without it) or system. dbproxy's TLS reads and writes each
    # allocate a record buffer; glibc slows down on them once many sessions have come and
    # gone (services/dbproxy/allocator.py, docs/performance.md).
    allocator: Literal["auto", "jemalloc", "system"] = "auto"
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Seconds between heartbeats to auth (database health, shown by `cgctl status`); between
    # them the proxy re-checks the databases that are down or were used lately.
    heartbeat_interval: Duration = 10.0

    _heartbeat = field_validator("heartbeat_interval", mode="before")(parse_duration)

    @field_validator("heartbeat_interval")
    @classmethod
    def _min_heartbeat(cls, v: float) -> float:
        if not 0.2 <= v <= 3600:
            raise ValueError("heartbeat_interval must be between 0.2s and 1h")
        return v


class Config(_Model):
    version: Literal["v1"] = "v1"
    data_dir: str = "/var/lib/cachegate"
    # host:port of the auth mesh port, for services that are not auth. Several auth
    # processes (HA): a list, a comma-separated string, or one DNS name with several
    # addresses; calls are spread over them and fail over (docs/ha.md).
    auth_server: str | list[str] = f"127.0.0.1:{DEFAULT_AUTH_PORT}"
    # host:port of the auth join port, or several (tried in turn); default: each
    # auth_server host, port 3026.
    join_server: str | list[str] = ""
    join: JoinParams = Field(default_factory=JoinParams)
    # Plaintext grpc.health.v1 for probes that cannot present a client certificate (kubelet,
    # compose healthchecks), e.g. 0.0.0.0:3090 in a pod or 127.0.0.1:3090 on a host. Empty = off.
    health_listen_addr: str = ""
    log: LogConfig = Field(default_factory=LogConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    auth_service: AuthServiceConfig = Field(default_factory=AuthServiceConfig)
    discovery_service: DiscoveryServiceConfig = Field(default_factory=DiscoveryServiceConfig)
    dbproxy_service: DbProxyServiceConfig = Field(default_factory=DbProxyServiceConfig)

    def service_dir(self, service: str) -> Path:
        return Path(self.data_dir) / service

    @field_validator("auth_server", "join_server")
    @classmethod
    def _addresses(cls, v: str | list[str], info) -> str | list[str]:
        if v or info.field_name == "auth_server":
            try:
                parse_addresses(v, DEFAULT_AUTH_PORT, info.field_name)
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        return v

    def auth_addresses(self) -> list[str]:
        """Every auth mesh address (``host:port``), in the order given."""
        return parse_addresses(self.auth_server, DEFAULT_AUTH_PORT)

    def join_addresses(self) -> list[str]:
        """Every auth join address, tried in turn when joining."""
        if self.join_server:
            return parse_addresses(self.join_server, DEFAULT_JOIN_PORT, "join_server")
        return [join_hostport(split_hostport(a, DEFAULT_AUTH_PORT)[0], DEFAULT_JOIN_PORT)
                for a in self.auth_addresses()]

    def join_address(self) -> str:
        """The join addresses as one comma-separated string (what `ensure_joined` takes)."""
        return ",".join(self.join_addresses())


def split_hostport(addr: str, default_port: int) -> tuple[str, int]:
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"invalid address {addr!r}: use host:port") from None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addresses(value: str | Iterable[str], default_port: int, what: str = "auth_server") -> list[str]:
    """``host:port`` strings from one address, a comma-separated string or a list; each gets
    ``default_port`` when it names none. Raises ConfigError (one line) on a bad entry."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        raw = str(raw).strip()
        if not raw:
            continue
        try:
            host, port = split_hostport(raw, default_port)
        except ConfigError:
            raise ConfigError(f"{what}: invalid address {raw!r}: use host:port, or a list of them") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"{what}: invalid address {raw!r}: use host:port, or a list of them")
        hp = join_hostport(host, port)
        if hp not in out:
            out.append(hp)
    if not out:
        raise ConfigError(f"{what}: no address given: give the auth service's host:port (or a list of them)")
    return out


def _set_path(data: dict, path: list[str], value: Any, var: str) -> None:
    node = data
    model: type[BaseModel] | None = Config
    for i, key in enumerate(path):
        fields = model.model_fields if model else {}
        if model is not None and key not in fields:
            raise ConfigError(
                f"unknown config key {'.'.join(path[: i + 1])!r} in environment variable {var}: "
                "check its spelling against docs/config.md"
            )
        if i == len(path) - 1:
            node[key] = value
            return
        ann = fields[key].annotation if model is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]


def apply_env(data: dict, environ: dict[str, str]) -> dict:
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in ENV_NOT_CONFIG or var.startswith(ENV_DB_SECRET_PREFIX):
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX):].split("__") if p]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if value is None:
            value = ""
        _set_path(data, path, value, var)
    return data


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key {loc!r}: check its spelling against docs/config.md"
    return f"{source}: {loc}: {err['msg'].removeprefix('Value error, ')}"


def load_config(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None,
                data: dict | None = None) -> Config:
    """Load, apply environment overrides, validate. Raises :class:`ConfigError`."""
    environ = dict(os.environ if environ is None else environ)
    source = str(path) if path else "config"
    if data is None:
        data = {}
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: not UTF-8 text (a stray byte at offset {exc.start}): "
                                  "save the config as UTF-8") from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: the config must be a YAML mapping")
    data = apply_env(data, environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def dump_config(cfg: Config, only_set: bool = True) -> str:
    data = cfg.model_dump(mode="json", exclude_unset=only_set)
    return yaml.safe_dump(data, sort_keys=False)
