"""Watch streams start over when the storage says changes may have been missed."""

from __future__ import annotations

import pytest

from services.auth.backend import SQLiteBackend
from services.auth.roles import AdminPolicy
from services.auth.watch import Subscription, WatchOverflow
from services.common import rbac


async def test_a_reset_ends_the_subscription_so_the_client_starts_over(tmp_path):
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    with Subscription(backend, "databases/") as sub:
        await backend.put("databases/a", b"1")
        assert (await sub.get(1)).key == "databases/a"
        backend._notify_reset()
        with pytest.raises(WatchOverflow):
            await sub.get(1)
    await backend.close()


async def test_a_reset_makes_the_admin_policy_read_every_role_again(tmp_path):
    import asyncio
    import json

    backend = SQLiteBackend(tmp_path / "db.sqlite")
    policy = AdminPolicy(backend)
    await policy.start()
    role = rbac.Role.from_dict({"kind": "role", "version": "v1", "metadata": {"name": "token-admin"},
                                "spec": {"allow": {"rules": [{"resources": ["token"], "verbs": ["*"]}]}}})
    # A write this process did not hear about (as from another auth process while the
    # listener was away) ...
    backend._watchers_saved, backend._watchers = backend._watchers, []
    await backend.put("roles/token-admin", json.dumps(role.to_dict()).encode())
    backend._watchers = backend._watchers_saved
    assert "token-admin" not in policy.roles
    # ... is picked up after a reset.
    backend._notify_reset()
    for _ in range(50):
        if "token-admin" in policy.roles:
            break
        await asyncio.sleep(0.02)
    assert "token-admin" in policy.roles
    policy.stop()
    await backend.close()
