"""The stand-in for `cachegate dev`: a process serving ARM and Entra ID on loopback, and what
the dev cluster's discovery and dbproxy need to use it (config section, environment).

    proc, info = start_process(home / "azure", state_file=None)   # sample_state.yaml by default
    cfg["discovery_service"].update(discovery_section(info))
    env.update(credential_env(info))                              # client secret of the state
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .state import load_config

SAMPLE_STATE = Path(__file__).resolve().parent / "sample_state.yaml"


def start_process(folder: Path, state_file: Path | None = None, timeout: float = 20.0,
                  log_file: Path | None = None, port: int = 0, keep: bool = False) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m services.azure_standin`` and wait until it listens. Returns the
    process and its info (base_url, authority_host, ca_file, imds_url, ...). With ``keep``
    its signing key and the tokens it issued are kept in ``folder``, so that a stand-in
    started again there accepts the tokens its clients hold."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_file = state_file or SAMPLE_STATE
    ready = folder / "standin.json"
    ready.unlink(missing_ok=True)
    log = open(log_file or folder / "standin.log", "ab")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.azure_standin", "--state", str(state_file), "--port", str(port),
         "--ca-out", str(folder / "ca.pem"), "--ready-file", str(ready), *(["--keep-dir", str(folder)] if keep else [])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            info["state_file"] = str(state_file)
            return proc, info
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the Azure stand-in did not start; see {log.name}")


def endpoints(info: dict) -> dict:
    return {"resource_manager": info["base_url"], "authority_host": info["authority_host"],
            "ca_file": info["ca_file"]}


def discovery_section(info: dict, regions: tuple[str, ...] = ("*",)) -> dict:
    """What to merge into ``discovery_service`` of the dev config."""
    return {"azure": [{"types": ["redis"], "regions": list(regions)}], "azure_endpoints": endpoints(info),
            "poll_interval": 10}


def credential_env(info: dict) -> dict[str, str]:
    """AZURE_* variables for EnvironmentCredential with the state's first service principal."""
    cfg = load_config(info["state_file"])
    if not cfg.client_credentials:
        return {}
    sp = cfg.client_credentials[0]
    return {"AZURE_TENANT_ID": cfg.tenant, "AZURE_CLIENT_ID": sp.client_id, "AZURE_CLIENT_SECRET": sp.client_secret,
            "AZURE_AUTHORITY_HOST": info["authority_host"]}
