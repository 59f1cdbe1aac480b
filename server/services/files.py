"""The rules of model files (`/v2/files`, issue 19): who may pull and remove, what a pull asks of which
workers, when a removal is refused, and how an agent's inventory report becomes rows.

Workers are cluster resources: admins and operators pull and remove; every signed-in user may list.
An agent reports its whole cache (`PUT /v2/agent/files`) only when something in it changed; rows are
written only where a field differs, so a report that changes nothing writes nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from server import schemas
from server.db import tables
from server.schemas.files import key_or_none

# What an agent may store of its reading per source (config.json of a huge model is still kilobytes).
MAX_METADATA_BYTES = 512 * 1024
# Instances in these states use their files (a terminating one still runs until it is stopped).
USING = frozenset({"scheduled", "downloading", "starting", "running", "error", "unreachable", "terminating"})


class FilesRefused(Exception):
    """A request the rules refuse: `status` (400, 404, 409) and a message for the operator."""

    def __init__(self, status: int, message: str, details: Any = None):
        super().__init__(message)
        self.status, self.details = status, details


async def chosen_workers(session: Any, body: schemas.FilePull) -> list[tables.Worker]:
    """The workers a pull names: by name, else those matching every label (else all)."""
    rows = (await session.execute(select(tables.Worker).order_by(tables.Worker.id))).scalars().all()
    if body.workers:
        by_name = {w.name: w for w in rows}
        missing = [n for n in body.workers if n not in by_name]
        if missing:
            raise FilesRefused(404, f"no worker named {', '.join(missing[:10])}", {"missing": missing[:100]})
        chosen = [by_name[n] for n in dict.fromkeys(body.workers)]
    else:
        chosen = list(rows)
    chosen = [w for w in chosen if all((w.labels or {}).get(k) == v for k, v in body.labels.items())]
    if not chosen:
        raise FilesRefused(404, "no worker matches " + (f"labels {body.labels}" if body.labels else "(none registered)"))
    return chosen


async def pull(session: Any, body: schemas.FilePull) -> list[tables.ModelFile]:
    """Ask each chosen worker for the source: a new row is `pending`; one in error (or being removed) is asked
    again; one pulling or ready stays as it is."""
    key = schemas.file_key(body.source)
    workers = await chosen_workers(session, body)
    existing = {f.worker_id: f for f in (await session.execute(select(tables.ModelFile).where(
        tables.ModelFile.source == key, tables.ModelFile.worker_id.in_([w.id for w in workers])))).scalars()}
    out = []
    for worker in workers:
        row = existing.get(worker.id)
        if row is None:
            row = tables.ModelFile(worker_id=worker.id, worker_name=worker.name, source=key, state="pending",
                                   message="waiting for the worker's agent", size_bytes=0, path="")
            session.add(row)
        elif row.state in ("error", "removing"):
            row.state, row.progress, row.message = "pending", None, "pull asked again"
        out.append(row)
    await session.flush()
    return out


async def users_of(session: Any, row: tables.ModelFile) -> list[str]:
    """Instances on the row's worker whose source is these files."""
    instances = (await session.execute(select(tables.ModelInstance.name, tables.ModelInstance.spec).where(
        tables.ModelInstance.worker_id == row.worker_id,
        tables.ModelInstance.state.in_(USING)))).all()
    return [name for name, spec in instances if key_or_none(str((spec or {}).get("source", ""))) == row.source]


async def remove(session: Any, row: tables.ModelFile) -> str:
    """Refused (409) while an instance on that worker uses the files; a request never taken goes at once,
    otherwise the row turns `removing` and the agent deletes the files. Returns what happened."""
    users = await users_of(session, row)
    if users:
        raise FilesRefused(409, f"{row.source} on {row.worker_name} is used by instance {', '.join(users[:5])}; "
                                "delete or move those first", {"instances": users[:100]})
    if row.state == "pending":
        await session.delete(row)
        return "deleted"
    row.state, row.progress, row.message = "removing", None, "waiting for the worker's agent to delete the files"
    return "removing"


def _metadata(entry: schemas.AgentFileEntry) -> dict[str, Any] | None:
    if not entry.metadata:
        return None
    if len(json.dumps(entry.metadata, separators=(",", ":"))) > MAX_METADATA_BYTES:
        return None  # too large to keep: the estimate goes without it
    return entry.metadata


def _same_time(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs((a - b).total_seconds()) < 1


async def apply_inventory(session: Any, worker: tables.Worker, inventory: schemas.AgentFileInventory) -> int:
    """An agent's whole cache: rows updated where a field differs, new ones added, rows it no longer lists
    removed (except requests it has not taken yet). Returns how many rows changed."""
    rows = {f.source: f for f in (await session.execute(select(tables.ModelFile).where(
        tables.ModelFile.worker_id == worker.id))).scalars()}
    changed = 0
    listed: set[str] = set()
    for entry in inventory.files:
        key = key_or_none(entry.source)
        if key is None or key in listed:
            continue
        listed.add(key)
        row = rows.get(key)
        if row is None:
            row = tables.ModelFile(worker_id=worker.id, worker_name=worker.name, source=key)
            session.add(row)
        elif row.state == "removing" and entry.state != "pulling":
            continue  # asked to go: the agent deletes it on its next look at its rows
        elif row.state == "pending" and entry.state == "error":
            continue  # asked again after an error: the agent's old error must not answer the new request
        values = {"revision": entry.revision, "path": entry.path, "size_bytes": entry.size_bytes,
                  "state": entry.state, "progress": entry.progress if entry.state == "pulling" else None,
                  "message": entry.message, "worker_name": worker.name}
        if entry.metadata is not None or entry.state != "ready":  # a reading is sent once; None keeps it
            values["file_metadata"] = _metadata(entry)
        fresh = row.id is None
        for name, value in values.items():
            if getattr(row, name, None) != value:
                setattr(row, name, value)
                fresh = True
        used = datetime.fromtimestamp(entry.last_used_at, UTC) if entry.last_used_at is not None else None
        if not _same_time(row.last_used_at, used):
            row.last_used_at = used
            fresh = True
        changed += fresh
    for key, row in rows.items():
        if key not in listed and row.state != "pending":
            await session.delete(row)  # gone from the cache (removed, evicted, or deleted by hand)
            changed += 1
    return changed
