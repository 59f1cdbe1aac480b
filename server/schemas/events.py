"""The wire contract of events and of the watch stream (`GET /v2/watch`). Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from server.schemas import Schema


class EventOut(Schema):
    id: int
    kind: str
    object_id: int | None = None
    object_name: str
    reason: str
    message: str = ""
    actor: str = ""
    team: str | None = None
    created_at: datetime


WATCH_KINDS: tuple[str, ...] = ("workers", "models", "instances", "events", "files", "alerts")


class WatchMessage(Schema):
    """One line of `GET /v2/watch`.

    `snapshot` carries `items` (kind -> list of objects); `event` carries `kind`,
    `action` and `object`; `heartbeat` only the version. Clients resume with
    `?since=<version>`; a version the server no longer holds yields a new snapshot.
    A large snapshot comes as several `snapshot` lines, all but the last with `more`
    (server/ndjson.py joins them).
    """

    type: Literal["snapshot", "event", "heartbeat"]
    version: int
    kind: str | None = None
    action: Literal["created", "updated", "deleted"] | None = None
    object: dict[str, Any] | None = None
    items: dict[str, list[dict[str, Any]]] | None = None
    more: bool = False
