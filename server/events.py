"""Recording events: who did what to which object, and why. Written in the caller's transaction."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from server.db import tables


def record_event(session: AsyncSession, kind: str, obj: object, reason: str, message: str = "", actor: str = "") -> None:
    session.add(tables.Event(
        kind=kind,
        object_id=getattr(obj, "id", None),
        object_name=getattr(obj, "name", str(obj)),
        reason=reason,
        message=message,
        actor=actor,
        team=getattr(obj, "team", None),  # models' and instances': who may read the event
    ))
