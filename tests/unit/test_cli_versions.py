"""cgate and the cluster may be at most one major version apart."""

from __future__ import annotations

import pytest

from services.cli import cgate
from services.cli.common import CLIError


@pytest.mark.parametrize("client,server,ok", [
    ("1.4.0", "1.0.2", True), ("2.0.0", "1.9.0", True), ("1.0.0", "2.3.0", True),
    ("3.0.0", "1.0.0", False), ("1.0.0", "3.1.0", False),
])
def test_major_version_skew(monkeypatch, client, server, ok):
    monkeypatch.setattr(cgate, "VERSION", client)
    if ok:
        cgate._check_versions(server)
    else:
        with pytest.raises(CLIError, match=f"install cgate v{server.split('.')[0]}.x"):
            cgate._check_versions(server)
