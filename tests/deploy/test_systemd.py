"""The systemd units (deploy/systemd -> services/installer/systemd): `systemd-analyze verify`
finds nothing to say, and they fit what `cachegate db configure create` writes."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import dbconfigure
from services.common.config import Config, load_config
from services.installer import INSTALL_PREFIX, SYSTEMD_DIR, unit_files

REPO = Path(__file__).resolve().parents[2]
SYSTEM_UNITS = Path("/usr/lib/systemd/system") if Path("/usr/lib/systemd/system/sysinit.target").exists() \
    else Path("/lib/systemd/system")


def units() -> dict[str, configparser.ConfigParser]:
    out = {}
    for path in unit_files():
        cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        cp.optionxform = str
        cp.read_string(path.read_text())
        out[path.name] = cp
    return out


def verify_units(root: Path, scratch: Path) -> None:
    """systemd-analyze verify --root: the units of root/etc/systemd/system with the system's
    own units beside them (sysinit.target, ...), and nothing on stderr, not even a warning."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    vroot = scratch / "verify-root"
    shutil.copytree(root, vroot, symlinks=True, dirs_exist_ok=True)
    shutil.copytree(SYSTEM_UNITS, vroot / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    cachegate = vroot / INSTALL_PREFIX.lstrip("/") / "bin/cachegate"
    if not cachegate.exists():
        cachegate.parent.mkdir(parents=True, exist_ok=True)
        cachegate.write_text("#!/bin/sh\n")
        cachegate.chmod(0o755)
    (vroot / "etc/cachegate.yaml").touch()
    names = sorted(p.name for p in (vroot / "etc/systemd/system").glob("cachegate*.service"))
    assert names
    r = subprocess.run([analyze, "verify", f"--root={vroot}", *names], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def test_units_pass_systemd_analyze_verify(tmp_path):
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for u in unit_files():
        shutil.copy(u, root / "etc/systemd/system" / u.name)
    verify_units(root, tmp_path)


def test_deploy_systemd_is_the_installed_units():
    assert (REPO / "deploy/systemd").resolve() == SYSTEMD_DIR
    assert {u.name for u in unit_files()} == {"cachegate.service", "cachegate-auth.service",
                                              "cachegate-discovery.service", "cachegate-dbproxy.service"}


def test_units_fit_the_config_db_configure_writes():
    data_dir = Config().data_dir
    for name, cp in units().items():
        svc = cp["Service"]
        # Root's 0600 config reaches the unprivileged user through systemd's credentials.
        assert svc["LoadCredential"] == f"cachegate.yaml:{dbconfigure.DEFAULT_OUTPUT}", name
        assert svc["ExecStart"].startswith(f"{INSTALL_PREFIX}/bin/cachegate start -c %d/cachegate.yaml"), name
        assert svc["User"] == svc["Group"] == "cachegate", name
        assert f"/var/lib/{svc['StateDirectory']}" == data_dir and svc["StateDirectoryMode"] == "0700", name
        assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "true", name
        assert cp["Unit"]["ConditionPathExists"] == str(dbconfigure.DEFAULT_OUTPUT), name
        service = name.removeprefix("cachegate-").removesuffix(".service")
        if name == "cachegate.service":
            assert "--service" not in svc["ExecStart"]
            assert set(cp["Unit"]["Conflicts"].split()) == {f"cachegate-{s}.service"
                                                            for s in ("auth", "discovery", "dbproxy")}
        else:
            assert svc["ExecStart"].endswith(f"--service {service}")
            assert cp["Unit"]["Conflicts"] == "cachegate.service"


def test_db_configure_create_writes_a_root_only_file_with_the_token_inline(tmp_path):
    """The guide's /tmp/token is not visible to a unit with PrivateTmp: the token goes in
    the (0600) config itself."""
    token = tmp_path / "token"
    token.write_text("abc123token\n")
    out = tmp_path / "etc" / "cachegate.yaml"
    r = CliRunner().invoke(dbconfigure.app, ["create", "-o", f"file://{out}", "--proxy=proxy.example.com:3080",
                                             f"--token={token}", "--azure-redis-discovery=eastus",
                                             "--ca-pin=sha256:ab"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    cfg = load_config(out, environ={})
    assert cfg.join.token == "abc123token" and cfg.data_dir == "/var/lib/cachegate"


def test_db_configure_create_o_file_writes_the_host_config_that_the_entrypoints_read(tmp_path, monkeypatch):
    """`-o file` writes system_config_path(): $CACHEGATE_SYSTEM_CONFIG when set (a test's own
    root), the same file cgctl and `cachegate-dbproxy` look for."""
    from services.cli import daemon

    host_cfg = tmp_path / "root" / "etc" / "cachegate.yaml"
    monkeypatch.setenv("CACHEGATE_SYSTEM_CONFIG", str(host_cfg))
    monkeypatch.delenv("CACHEGATE_CONFIG", raising=False)
    r = CliRunner().invoke(dbconfigure.app, ["create", "-o", "file", "--proxy=proxy.example.com:3080", "--token=t",
                                             "--azure-redis-discovery=eastus", "--ca-pin=sha256:ab"])
    assert r.exit_code == 0, r.output
    assert f"Wrote the config to {host_cfg}" in r.output and host_cfg.exists()
    seen = {}
    monkeypatch.setattr(daemon, "app", lambda: seen.setdefault("argv", list(daemon.sys.argv)))
    monkeypatch.setattr(daemon.sys, "argv", ["cachegate-dbproxy"])
    daemon.main_dbproxy()
    assert seen["argv"][1:] == ["start", "-c", str(host_cfg), "--service", "dbproxy"]
