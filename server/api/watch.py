"""`GET /v2/watch`: a snapshot, then one JSON event per line, with heartbeats.

The snapshot goes out in pages: `snapshot` lines of about `_PAGE_BYTES` each, all but the last
marked `"more": true`, so no line grows with the cluster (readers join them: server/ndjson.py).
A small cluster's snapshot is one line, as before.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from sqlalchemy import or_, select

from server import schemas
from server.api.agent_api import subordinate_ids
from server.api.alerts import alerts_snapshot
from server.api.errors import bad_request, forbidden, parse_whole_number
from server.api.resources import instance_out, model_out, ready_counts
from server.api.routing import NDJSON, Query, comma_list, integer, principal_of, route, server_of
from server.bus import BusEvent, Frame
from server.db import tables
from server.services import access
from server.services.alerts import sees_alert

_TABLES = {"workers": tables.Worker, "models": tables.Model, "instances": tables.ModelInstance,
           "files": tables.ModelFile}
_SNAPSHOT_EVENTS = 200
_PAGE_BYTES = 256 * 1024  # one snapshot line holds about this much (one object more when alone larger)


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _snapshot_lines(version: int, items: dict[str, list[dict[str, Any]]]) -> list[bytes]:
    """The snapshot as page lines; every page names every kind (empty where it has none of it)."""
    pages: list[dict[str, list[str]]] = [{kind: [] for kind in items}]
    size = 0
    for kind, objects in items.items():
        for obj in objects:
            text = json.dumps(obj, separators=(",", ":"))
            if size and size + len(text) > _PAGE_BYTES:
                pages.append({k: [] for k in items})
                size = 0
            pages[-1][kind].append(text)
            size += len(text) + 1
    return [_page_line(version, page, more=number < len(pages) - 1) for number, page in enumerate(pages)]


def _page_line(version: int, page: dict[str, list[str]], more: bool) -> bytes:
    items = ",".join(f'{json.dumps(kind)}:[{",".join(texts)}]' for kind, texts in page.items())
    more_field = ',"more":true' if more else ""
    return f'{{"type":"snapshot","version":{version}{more_field},"items":{{{items}}}}}\n'.encode()


async def _snapshot(server: Any, kinds: list[str], worker_id: int | None, caller: Any) -> dict[str, list[dict[str, Any]]]:
    items: dict[str, list[dict[str, Any]]] = {}
    teams = access.visible_teams(caller) if worker_id is None else None
    async with server.db.session() as s:
        for kind in kinds:
            if kind == "events":
                query = select(tables.Event).order_by(tables.Event.id.desc()).limit(_SNAPSHOT_EVENTS)
                if (visible := access.event_clause(caller)) is not None:
                    query = query.where(visible)
                rows = (await s.execute(query)).scalars().all()
                items[kind] = [schemas.EventOut.model_validate(r).model_dump(mode="json") for r in reversed(rows)]
                continue
            if kind == "alerts":  # the newest, firing ones first (server/api/alerts.py)
                items[kind] = await alerts_snapshot(s, caller)
                continue
            table = _TABLES[kind]
            query = select(table).order_by(table.id)
            if worker_id is not None and kind == "files":  # an agent: its own cache's rows
                query = query.where(table.worker_id == worker_id)
            elif worker_id is not None:
                query = query.where(await _instances_of_worker(s, worker_id))
            elif teams is not None and kind not in ("workers", "files"):  # a team's models and instances: its own
                query = query.where(table.team.in_(teams))
            rows = (await s.execute(query)).scalars().all()
            if kind == "models":
                ready = await ready_counts(s)
                items[kind] = [model_out(r, ready, caller).model_dump(mode="json") for r in rows]
            elif kind == "instances":
                items[kind] = [(instance_out(r, caller) if worker_id is None else schemas.InstanceOut.model_validate(r))
                               .model_dump(mode="json") for r in rows]
            elif kind == "files":
                items[kind] = [schemas.ModelFileOut.model_validate(r).model_dump(mode="json") for r in rows]
            else:
                items[kind] = [schemas.WorkerOut.model_validate(r).model_dump(mode="json") for r in rows]
    return items


async def _instances_of_worker(session: Any, worker_id: int) -> Any:
    """Where a worker's agent watches: instances placed on it, and those it is a subordinate of
    (multi-host placements: it runs their Ray worker node)."""
    others = (await session.execute(select(tables.ModelInstance.id, tables.ModelInstance.claim).where(
        tables.ModelInstance.worker_id != worker_id))).all()
    # Claims are JSON; matching them in Python keeps one query for SQLite, PostgreSQL and MariaDB.
    subordinate = [row.id for row in others if worker_id in subordinate_ids(row.claim)]
    return or_(tables.ModelInstance.worker_id == worker_id, tables.ModelInstance.id.in_(subordinate))


def _visible(event: BusEvent, worker_id: int | None, caller: Any) -> bool:
    if worker_id is not None:
        return event.object.get("worker_id") == worker_id or worker_id in subordinate_ids(event.object.get("claim"))
    if event.kind == "events":
        obj = event.object
        return access.sees_event(caller, obj.get("kind", ""), obj.get("team"), obj.get("object_name", ""),
                                 obj.get("actor", ""))
    if event.kind == "alerts":
        return sees_alert(caller, event.object.get("object_kind", ""), event.object.get("team"))
    if event.kind in ("models", "instances"):
        return access.team_access(caller, event.object.get("team")) is not None
    return True


def _event_line(event: BusEvent, worker_id: int | None, caller: Any) -> bytes:
    obj = event.object
    spec = obj.get("spec")
    if (worker_id is None and event.kind in ("models", "instances") and isinstance(spec, dict) and spec.get("env")
            and not access.sees_secrets(caller, obj.get("team"))):
        obj = {**obj, "spec": {**spec, "env": access.redact_env(spec["env"])}}
        return _line({"type": "event", "version": event.version, "kind": event.kind, "action": event.action,
                      "object": obj})
    return event.line()  # encoded once for every watcher that sees it as is


@route("GET", "/v2/watch", "Stream changes as JSON lines: a snapshot, then events, with heartbeats",
       auth="user_or_worker", content={NDJSON: None},
       query={"kinds": Query("comma-separated: " + ",".join(schemas.WATCH_KINDS), comma_list(*schemas.WATCH_KINDS)),
              "since": Query("resume after this version", integer(0, 2**63 - 1))})
async def watch(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    principal = principal_of(request)
    kinds = [k for k in request.query.get("kinds", ",".join(schemas.WATCH_KINDS)).split(",") if k]
    unknown = [k for k in kinds if k not in schemas.WATCH_KINDS]
    if unknown or not kinds:
        raise bad_request(f"unknown kinds {unknown}; choose from {', '.join(schemas.WATCH_KINDS)}")
    worker_id = None
    if principal.kind == "worker":
        if kinds not in (["instances"], ["files"]):
            raise forbidden("a worker may watch only its instances (kinds=instances) or its files (kinds=files)")
        worker_id = principal.worker_id
    since_text = request.query.get("since")
    since = parse_whole_number(since_text) if since_text is not None else None
    if since_text is not None and since is None:
        raise bad_request("since must be a version number")

    # An agent's subscription is offered only its instances' changes; watchers of workers take the
    # coalesced telemetry frames (server/telemetry.py).
    subscription = server.bus.subscribe(kinds, worker_id=worker_id,
                                        telemetry=worker_id is None and "workers" in kinds)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        replay = server.bus.since(since) if since is not None else None
        if replay is None:
            version = server.bus.version
            items = await _snapshot(server, kinds, worker_id, principal)
            for line in _snapshot_lines(version, items):
                await response.write(line)
        else:
            for event in replay:
                if event.kind in kinds and _visible(event, worker_id, principal):
                    await response.write(_event_line(event, worker_id, principal))
        await response.write(_line({"type": "heartbeat", "version": server.bus.version}))
        while True:
            try:
                async with asyncio.timeout(server.config.watch_heartbeat):  # not wait_for: see server/reconcile.py
                    event = await subscription.get()
            except TimeoutError:
                await response.write(_line({"type": "heartbeat", "version": server.bus.version}))
                continue
            # What queued meanwhile goes out in one write (a burst of 500 changes is not 500 writes).
            batch = [event]
            while event is not None and len(batch) < 1000 and not subscription.queue.empty():
                batch.append(event := subscription.queue.get_nowait())
            lines = [e.line if isinstance(e, Frame) else _event_line(e, worker_id, principal)
                     for e in batch if e is not None and (isinstance(e, Frame) or _visible(e, worker_id, principal))]
            if lines:
                await response.write(b"".join(lines))
            if event is None:  # fell behind: end the stream, the client resumes with a snapshot
                break
    except ConnectionResetError:
        pass
    finally:
        subscription.close()
    return response
