"""The audit log: every change made through /v2 (who, from where, what, how it ended), kept for
`audit_retention_days`; admins read it (`GET /v2/audit`, `maas audit`).

Recorded by a middleware after the handler ran, so refused and failed changes are there too. What
was asked is summarised from the request with every secret left out (passwords, secret values,
tokens, env values); before-and-after values of a change are in its object's events.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import delete, select

from server import schemas
from server.api.errors import bad_request, parse_whole_number
from server.api.permissions import require_admin
from server.api.routing import PRINCIPAL_KEY, Query, integer, json_out, route, server_of
from server.db import tables

log = logging.getLogger(__name__)

_CHANGES = ("POST", "PUT", "PATCH", "DELETE")
# Machine traffic and questions that change nothing (registration stays: a worker joining is a change).
_NOT_CHANGES = ("/v2/agent/heartbeat", "/v2/agent/instances/", "/v2/models/evaluate", "/v2/gateway/authorize")
_HIDDEN_FIELDS = {"password", "value", "token", "key", "secret_hash"}
_SUMMARY_CHARS = 2000
_PARSED_BYTES = 64 * 1024  # bodies up to this size are summarised field by field
_PURGE_INTERVAL = 3600.0  # seconds between two purges of old entries by one server (the first change purges)
REDACTED = "<redacted>"


def _hide(value: Any, field: str = "") -> Any:
    if field in _HIDDEN_FIELDS:
        return REDACTED
    if field == "env" and isinstance(value, dict):  # names, and which secret; never a value
        return {k: v if isinstance(v, dict) else REDACTED for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _hide(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide(v) for v in value[:50]]
    return value


def summary(raw: bytes, query: str) -> str:
    """The request as it can be kept: JSON with secrets left out, the query string, cut to a size."""
    if len(raw) > _PARSED_BYTES:  # not parsed again on the loop; the handler read what it needed
        text = f"<{len(raw)} bytes>"
    else:
        try:
            body = json.loads(raw) if raw else None
            text = json.dumps(_hide(body), separators=(",", ":"), ensure_ascii=False) if body is not None else ""
        except (ValueError, RecursionError):
            text = f"<{len(raw)} bytes, not JSON>"
    if query:
        text = f"?{query} {text}".strip()
    return text[:_SUMMARY_CHARS]


def audit_middleware(retention_days: Callable[[], int]):
    purged_at = float("-inf")

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        nonlocal purged_at
        if request.method not in _CHANGES or not request.path.startswith("/v2/") \
                or request.path.startswith(_NOT_CHANGES):
            return await handler(request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except ValidationError:
            status = 422  # what the error middleware answers
            raise
        except Exception as exc:
            status = getattr(exc, "status", 500)
            raise
        finally:
            principal = request.get(PRINCIPAL_KEY)
            try:  # read already (bounded by the input middleware): this is the cached copy
                raw = await request.read() if request.body_exists and (request.content_length or 0) <= 1024**2 else b""
            except Exception:  # the client went away mid-body
                raw = b""
            actor = principal.name if principal is not None else _login_name(raw, request.path)
            entry = tables.AuditEntry(actor=actor[:140], address=(request.remote or "")[:100], method=request.method,
                                      path=request.path[:500], status=status,
                                      summary=summary(raw, request.query_string))
            purge = time.monotonic() - purged_at > _PURGE_INTERVAL
            if purge:
                purged_at = time.monotonic()
            await _write(server_of(request), entry, retention_days() if purge else None)

    return middleware


def _login_name(raw: bytes, path: str) -> str:
    if path == "/v2/auth/login":
        try:
            name = json.loads(raw).get("username")
            return f"{name} (login)" if isinstance(name, str) else "anonymous"
        except (ValueError, AttributeError, RecursionError):
            pass
    return "anonymous"


async def purge(session, days: int) -> None:
    """Delete the entries older than `days`, in the caller's transaction."""
    await session.execute(delete(tables.AuditEntry).where(tables.AuditEntry.at < datetime.now(UTC) - timedelta(days=days)))


async def _write(server: Any, entry: tables.AuditEntry, purge_days: int | None) -> None:
    try:
        async with server.db.session() as s:
            s.add(entry)
            if purge_days is not None:
                await purge(s, purge_days)
            await s.commit()
    except Exception as exc:  # the change itself stands; a lost entry is logged, not a 500
        log.warning("audit entry for %s %s not written: %s", entry.method, entry.path, exc)


@route("GET", "/v2/audit", "The audit log, newest first (admin)", response=schemas.AuditEntryOut, response_list=True,
       query={"limit": Query("how many (default 100, at most 1000)", integer(1, 1000, 100)),
              "actor": Query("only changes by this user", {"type": "string", "minLength": 1, "maxLength": 140}),
              "since": Query("only since this day, YYYY-MM-DD", {"type": "string", "format": "date"})})
async def list_audit(request: web.Request) -> web.Response:
    require_admin(request, "read the audit log")
    limit = parse_whole_number(request.query.get("limit", "100"), low=1, high=1000)
    if limit is None:
        raise bad_request("limit must be a whole number from 1 to 1000")
    query = select(tables.AuditEntry).order_by(tables.AuditEntry.id.desc()).limit(limit)
    if (actor := request.query.get("actor")) is not None:
        if not actor:
            raise bad_request("actor: a user name (not empty)")
        query = query.where(tables.AuditEntry.actor == actor)
    if since := request.query.get("since"):
        try:
            day = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise bad_request("since: a day as YYYY-MM-DD") from None
        query = query.where(tables.AuditEntry.at >= day)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
    return json_out([schemas.AuditEntryOut.model_validate(r) for r in rows])
