"""What a proxy serves so that a new host installs this cluster's version of Cachegate.

``GET /scripts/install.sh`` on the proxy's web port returns :mod:`install.sh <services.installer>`
with the version, the wheel's name and SHA-256 and the proxy's address filled in; the script
fetches ``/scripts/<wheel>`` from the same proxy (a wheel built from the code the proxy runs,
see :mod:`services.installer.wheel`), checks its hash, installs it into a virtual environment
under /opt/cachegate with its dependencies from PyPI, links the CLIs into /usr/local/bin and
installs the systemd units of ``systemd/``.

This package imports nothing but the standard library: install.sh runs it with the new
environment's Python before the dependencies are known to be there.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "install.sh"
SYSTEMD_DIR = HERE / "systemd"
INSTALL_PREFIX = "/opt/cachegate"
BIN_LINKS = ("cachegate", "cgctl", "cgate", "cachegate-auth", "cachegate-discovery", "cachegate-dbproxy")


def unit_files() -> list[Path]:
    return sorted(SYSTEMD_DIR.glob("*.service"))


def render_script(*, version: str, wheel_name: str, wheel_sha256: str, base_url: str, ca_pem: str = "") -> str:
    """install.sh with this cluster's values. ``ca_pem``: the CA the script trusts for its
    downloads (the cluster's host CA when the web port uses the host certificate; empty when
    the web port has a publicly trusted certificate)."""
    text = SCRIPT.read_text()
    values = {"@VERSION@": version, "@WHEEL_NAME@": wheel_name, "@WHEEL_SHA256@": wheel_sha256,
              "@BASE_URL@": base_url.rstrip("/"), "@CA_PEM@": ca_pem.strip()}
    for key, value in values.items():
        if "'" in value:
            raise ValueError(f"{key} must not contain a single quote")
        text = text.replace(key, value)
    return text
