"""install.sh, as the guide runs it (`curl https://PROXY/scripts/install.sh | bash`), into a
throwaway root (CACHEGATE_ROOT): the proxy's web app serves the script and the wheel over
TLS with a cluster-style CA; a second run changes nothing; the units it installs verify."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from aiohttp import web

from services.common import pki
from services.dbproxy.server import Installer, web_app
from services.installer import BIN_LINKS, unit_files
from tests.deploy.test_systemd import verify_units

pytestmark = pytest.mark.slow


class WebPort:
    """The dbproxy web app (install.sh and the wheel) on 127.0.0.1 over TLS, in a thread."""

    def __init__(self, tmp: Path):
        ca = pki.CertAuthority.create("test host CA", "test")
        key = pki.new_key()
        cert = ca.sign(key.public_key(), "proxy", None, dt.timedelta(days=1), ips=["127.0.0.1"],
                       dns_names=["localhost"], server=True)
        (tmp / "web.crt").write_bytes(pki.cert_to_pem(cert) + ca.cert_pem)
        (tmp / "web.key").write_bytes(pki.key_to_pem(key))
        self.ca_pem = ca.cert_pem.decode()
        import ssl

        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl.load_cert_chain(tmp / "web.crt", tmp / "web.key")
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()

        async def run():
            from cachegate.dbproxy.v1 import proxy_service_pb2

            self.runner = web.AppRunner(web_app(None, proxy_service_pb2.GetProxySettingsResponse(),
                                                Installer(self.ca_pem)))
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(run()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert started.wait(15)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root: type, mode, size, mtime, link target or content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_symlink():
                extra = os.readlink(p)
            elif p.is_file():
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                extra = ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, extra)
    return out


def test_install_sh_installs_into_a_throwaway_root_and_a_second_run_changes_nothing(tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    site = WebPort(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    # Dependencies would come from PyPI; the test installs the package alone.
    run_env = dict(os.environ, CACHEGATE_ROOT=str(root), CACHEGATE_PIP_ARGS="--no-deps --no-index",
                   CACHEGATE_PYTHON=os.environ.get("CACHEGATE_TEST_PYTHON", "/usr/bin/python3"))
    run_env.pop("PYTHONPATH", None)
    url = f"https://127.0.0.1:{site.port}/scripts/install.sh"
    ca = tmp_path / "ca.pem"
    ca.write_text(site.ca_pem)

    def install() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", f"curl -fsS --cacert {ca} {url} | bash"],
                              env=run_env, capture_output=True, text=True, timeout=180)
    try:
        first = install()
        assert first.returncode == 0, first.stdout + first.stderr
        before = tree(root)
        second = install()
        assert second.returncode == 0, second.stdout + second.stderr
        after = tree(root)
    finally:
        site.close()
    assert "nothing to do" in second.stdout and "nothing to do" not in first.stdout
    assert before == after, sorted(set(before.items()) ^ set(after.items()))[:10]

    venv = root / "opt" / "cachegate"
    for name in BIN_LINKS:
        assert os.readlink(root / "usr/local/bin" / name) == f"/opt/cachegate/bin/{name}"
        assert os.access(venv / "bin" / name, os.X_OK)
    installed = sorted(p.name for p in (root / "etc/systemd/system").iterdir())
    assert installed == [u.name for u in unit_files()]
    for u in unit_files():
        assert (root / "etc/systemd/system" / u.name).read_bytes() == u.read_bytes()
    # The installed package is this tree's code and version.
    dist = list((venv / "lib").glob("python3*/site-packages/cachegate-*.dist-info"))
    assert len(dist) == 1 and dist[0].name.startswith("cachegate-")
    site_pkgs = dist[0].parent
    here = Path(__file__).resolve().parents[2]
    assert (site_pkgs / "services/cli/daemon.py").read_bytes() == (here / "services/cli/daemon.py").read_bytes()
    # The units verify against the tree the script installed.
    verify_units(root, tmp_path)
