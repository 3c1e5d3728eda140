"""What auth and dbproxy both say about locks."""

from __future__ import annotations


def lock_applies(lock, user: str, roles) -> bool:
    """Whether ``lock`` (``user`` or ``role`` set) holds ``user``, directly or through one
    of ``roles``."""
    return (bool(lock.user) and lock.user == user) or (bool(lock.role) and lock.role in roles)


def locked_message(lock, user: str) -> str:
    """What a locked user is told. ``lock`` has ``user``, ``role`` and ``message`` (a stored
    lock or the Lock message)."""
    why = lock.message or "no reason given"
    who = f'user "{user}" is locked' if lock.user else f'user "{user}" is locked (role "{lock.role}" is locked)'
    return f"{who}: {why}; ask an administrator to remove the lock"
