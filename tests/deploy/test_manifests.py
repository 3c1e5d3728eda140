"""compose.yaml and the Kubernetes manifests name only what exists: images, commands
(console scripts or modules of this package), ports (the configs' listen addresses),
volumes, configs, secrets and their keys. No container runtime, no network."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import yaml

from services.common.config import load_config, split_hostport
from services.installer import compose as compose_steps

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SCRIPTS = set(PYPROJECT["project"]["scripts"])
IMAGE = f"cachegate:{VERSION}"
# Images from elsewhere: pinned to a major version, never :latest.
EXTERNAL_IMAGES = {"redis": re.compile(r"redis:\d+(\.\d+)*-bookworm"),
                   "postgres": re.compile(r"postgres:\d+(\.\d+)*-bookworm")}


def check_cachegate_command(cmd: list[str], where: str) -> None:
    if cmd[0] in ("python", "python3"):
        assert cmd[1] == "-m", where
        assert importlib.util.find_spec(cmd[2]) is not None, f"{where}: no module {cmd[2]}"
        assert cmd[2].startswith("services."), where
    else:
        assert cmd[0] in SCRIPTS, f"{where}: {cmd[0]} is not a console script of pyproject.toml"


def listen_ports(cfg) -> dict[str, int]:
    out = {}
    for section, keys in (("auth_service", ("listen_addr", "join_listen_addr")),
                          ("discovery_service", ("listen_addr",)),
                          ("dbproxy_service", ("listen_addr", "api_listen_addr", "redis_listen_addr",
                                               "web_listen_addr"))):
        sec = getattr(cfg, section)
        if sec.enabled:
            for k in keys:
                out[f"{section}.{k}"] = split_hostport(getattr(sec, k), 0)[1]
    if cfg.health_listen_addr:
        out["health_listen_addr"] = split_hostport(cfg.health_listen_addr, 0)[1]
    return out


def dockerfile_dirs() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"install -d [^\n]*?-m 0700 ([^\n]+)", text)
    return set(m.group(1).split())


def test_dockerfile_is_multistage_slim_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2 and "AS build" in text
    assert "slim" in re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.M) and "ARG UID=10001" in text
    assert "PYTHONUNBUFFERED=1" in text and "CACHEGATE_CONFIG=/etc/cachegate.yaml" in text
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / src).exists(), src
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == {3025, 3026, 3027, 3080, 3081, 3082, 3443, 3090}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())


def test_compose_names_only_what_exists(tmp_path):
    doc = compose()
    services = doc["services"]
    assert {"auth", "discovery", "dbproxy", "postgres", "redis", "azure", "init", "join"} <= set(services)
    init_dir = tmp_path / "init"
    compose_steps.init(init_dir)  # what the init step writes, for the paths the others read
    produced = {f"/init/{p.name}" for p in init_dir.iterdir()} | {"/init/azure-ca.pem"}
    produced |= {"/join/discovery.token", "/join/dbproxy.token", "/join/ca_pin"}
    declared_volumes = set(doc["volumes"])
    for name, svc in services.items():
        where = f"compose service {name}"
        image = svc["image"]
        if image.startswith("cachegate"):
            assert image == IMAGE, where
            assert (REPO / "deploy/compose" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() \
                == DEPLOY / "Dockerfile", where
            check_cachegate_command(svc["command"], where)
            assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and "/tmp" in svc["tmpfs"], where
        else:
            base = image.split(":")[0]
            assert EXTERNAL_IMAGES[base].fullmatch(image), f"{where}: {image}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{where}: depends on {dep}"
        mounts = {}
        for v in svc.get("volumes", []):
            src, target = v.split(":")[:2]
            assert src in declared_volumes, f"{where}: volume {src}"
            mounts[target] = src
        if "network_mode" in svc:
            assert svc["network_mode"].split(":")[1] in services, where
            assert "ports" not in svc, f"{where}: ports go on the service whose network it shares"
        cmd = [a for a in svc.get("command", []) if isinstance(a, str)]
        outputs = {cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a in ("--out", "--ca-out", "--ready-file")}
        for path in (a for a in cmd if a.startswith(("/init/", "/join/", "/auth-data/"))):
            if path not in outputs:
                assert path in produced or path.startswith("/auth-data/"), f"{where}: {path}"
            assert "/" + path.split("/")[1] in mounts, f"{where}: {path} is not on a mounted volume"
        for c in svc.get("configs", []):
            assert c["source"] in doc["configs"], where
            cfg_file = REPO / "deploy/compose" / doc["configs"][c["source"]]["file"]
            environ = {k: re.sub(r"\$\{[^}]+\}", "x", str(v)) for k, v in (svc.get("environment") or {}).items()}
            cfg = load_config(cfg_file, environ=environ)
            assert c["target"] == "/etc/cachegate.yaml", where
            assert [svc["command"][0]] == [f"cachegate-{name}"], where
            assert getattr(cfg, f"{name}_service").enabled, where
            ports = listen_ports(cfg)
            health = svc["healthcheck"]["test"]
            assert health[1:4] == ["cachegate", "health", "--addr"], where
            assert split_hostport(health[4], 0)[1] == ports["health_listen_addr"], where
            # Every file the config names is on a volume this service mounts, and is made by a step.
            for path in (cfg.join.token, cfg.join.ca_pin, cfg.discovery_service.azure_endpoints.ca_file,
                         cfg.dbproxy_service.azure_endpoints.ca_file, *cfg.dbproxy_service.database_ca_files):
                if path:
                    assert path in produced, f"{where}: {path}"
                    assert "/" + path.split("/")[1] in mounts, f"{where}: {path}"
            assert mounts.get("/var/lib/cachegate") and cfg.data_dir == "/var/lib/cachegate", where
            if name in ("discovery", "dbproxy"):
                assert cfg.auth_server == "auth:3025" and cfg.join_address() == "auth:3026", where
            if name == "dbproxy":
                published = {int(p.split(":")[-1]) for p in services["azure"]["ports"]}
                assert published == {ports["dbproxy_service.listen_addr"], ports["dbproxy_service.redis_listen_addr"],
                                     ports["dbproxy_service.web_listen_addr"]}
            if name == "auth":
                assert cfg.auth_service.storage.type == "postgres", where
                conn = svc["environment"]["CACHEGATE_AUTH_SERVICE__STORAGE__CONN_STRING"]
                assert "host=postgres" in conn and "${CACHEGATE_PG_PASSWORD" in conn
    # The compose volumes that hold state are the image's own 0700 folders (fresh named
    # volumes copy their owner from the image).
    assert {"/var/lib/cachegate", "/init", "/join"} <= dockerfile_dirs()
    # The join step reads the admin identity where auth writes it.
    join = services["join"]["command"]
    assert join[join.index("--identity") + 1] == "/auth-data/auth/admin-identity.pem"
    assert join[join.index("--auth-server") + 1] == "auth:3025"


def k8s_docs() -> list[dict]:
    kust = yaml.safe_load((DEPLOY / "kubernetes/kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / res).read_text()) if d]
    assert {i["name"]: i["newTag"] for i in kust["images"]} == {"cachegate": VERSION}
    return docs


def test_kubernetes_manifests_name_only_what_exists():
    docs = k8s_docs()
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"cachegate-auth", "cachegate-discovery", "cachegate-dbproxy"}
    configmaps, secrets = by_kind["ConfigMap"], by_kind["Secret"]
    for name, dep in deployments.items():
        service = name.removeprefix("cachegate-")
        pod = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001, name
        (ctr,) = pod["containers"]
        sc = ctr["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert ctr["image"] == "cachegate" and ctr["command"] == [f"cachegate-{service}"], name
        check_cachegate_command(ctr["command"], name)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
        for m in mounts.values():
            assert m["name"] in volumes, f"{name}: mount of {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, name
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, name
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"], name
        for ref in ctr.get("envFrom", []):
            assert ref["secretRef"]["name"] in secrets, name
        assert "/tmp" in mounts and "/var/lib/cachegate" in mounts, name
        cfg_mount = mounts["/etc/cachegate.yaml"]
        cm = configmaps[volumes[cfg_mount["name"]]["configMap"]["name"]]
        cfg = load_config(data=yaml.safe_load(cm["data"][cfg_mount["subPath"]]), environ={})
        assert getattr(cfg, f"{service}_service").enabled and cfg.data_dir == "/var/lib/cachegate", name
        ports = listen_ports(cfg)
        container_ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
        assert set(container_ports.values()) == set(ports.values()), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ctr[probe]["grpc"]["port"] == ports["health_listen_addr"], f"{name} {probe}"
        assert cfg.health_listen_addr.startswith("0.0.0.0:"), name  # the kubelet dials the pod's IP
        # Files the config names: on a mounted Secret that has that key.
        for path in (cfg.join.token, cfg.join.ca_pin):
            if not path:
                continue
            folder, key = path.rsplit("/", 1)
            secret = secrets[volumes[mounts[folder]["name"]]["secret"]["secretName"]]
            assert key in secret["stringData"], f"{name}: {path}"
        if service != "auth":
            host, port = split_hostport(cfg.auth_server, 0)
            auth_svc = by_kind["Service"][host]
            assert port in {p["port"] for p in auth_svc["spec"]["ports"]}
            assert split_hostport(cfg.join_address(), 0)[1] in {p["port"] for p in auth_svc["spec"]["ports"]}
    for name, svc in by_kind["Service"].items():
        sel = svc["spec"]["selector"]
        (dep,) = [d for d in deployments.values() if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        named = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named and p["targetPort"] != "health", f"service {name}: {p}"
    (pdb,) = by_kind["PodDisruptionBudget"].values()
    assert pdb["spec"]["selector"]["matchLabels"] == deployments["cachegate-dbproxy"]["spec"]["selector"]["matchLabels"]
    assert deployments["cachegate-dbproxy"]["spec"]["replicas"] > pdb["spec"]["minAvailable"]
