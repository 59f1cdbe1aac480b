"""The rules of alerts that are not rules of alerting: who sees which alert, which silences cover one, and
the webhooks' signing secrets (sealed with the team secrets' key, server/services/secrets.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import false, or_, select

from server.db import tables
from server.services import access
from server.services.secrets import SecretBox

# Alerts about cluster objects every user may read (as their events: server/services/access.py).
PUBLIC_KINDS = ("workers", "gpus")


def sees_alert(caller: access.Caller, object_kind: str, team: str | None) -> bool:
    """Admins and operators: every alert; users: their teams' objects and the cluster's own."""
    if access.runs_cluster(caller):
        return True
    if caller.kind != "user":
        return False
    if team is not None:
        return team in (access.visible_teams(caller) or ())
    return object_kind in PUBLIC_KINDS


def alert_clause(caller: access.Caller):
    """`sees_alert` as a WHERE clause on the alerts table (None: every alert)."""
    if access.runs_cluster(caller):
        return None
    if caller.kind != "user":
        return false()
    return or_(tables.Alert.team.in_(access.visible_teams(caller) or ()),
               tables.Alert.team.is_(None) & tables.Alert.object_kind.in_(PUBLIC_KINDS))


def silence_covers(silence: Any, rule: str, object_name: str, now: datetime) -> bool:
    ends = silence.ends_at if silence.ends_at.tzinfo else silence.ends_at.replace(tzinfo=UTC)
    return silence.rule == rule and silence.object_name in (None, object_name) and ends > now


async def active_silences(session) -> list[tables.AlertSilence]:
    now = datetime.now(UTC)
    return list((await session.execute(select(tables.AlertSilence).where(tables.AlertSilence.ends_at > now)))
                .scalars())


async def secret_box(server: Any, session) -> SecretBox:
    """The servers' secrets key, opened once per server (the same box team secrets use)."""
    if server.secret_box is None:
        server.secret_box = await SecretBox.open(session, server.config.data_dir)
    return server.secret_box
