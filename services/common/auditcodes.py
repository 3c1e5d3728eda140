"""Stable short codes of audit event types, the same whichever service records the event:
``I`` for success, ``W`` for failure."""

from __future__ import annotations

# Stable codes per event type.
CODES = {
    "join.token.create": "T1000I",
    "join.token.delete": "T1001I",
    "join": "T1002I",
    "user.login": "T2000I",
    "user.create": "T2001I",
    "user.update": "T2002I",
    "user.delete": "T2003I",
    "user.reset": "T2004I",
    "user.invite.redeem": "T2005I",
    "user.cert.database": "T2006I",
    "role.put": "T3000I",
    "role.delete": "T3001I",
    "lock.create": "T4000I",
    "lock.delete": "T4001I",
    "db.session.start": "T5000I",
    "db.session.query": "T5001I",
    "db.session.end": "T5002I",
    "db.session.terminate": "T5003I",
    "db.put": "T6000I",
    "db.delete": "T6001I",
}


def code_for(type_: str, success: bool) -> str:
    code = CODES.get(type_, "")
    return code[:-1] + "W" if code and not success else code
