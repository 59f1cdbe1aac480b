"""`GET /v2/usage`: gateway requests and tokens per day, API key and model."""

from __future__ import annotations

from datetime import date

from aiohttp import web
from sqlalchemy import func, select

from server import schemas
from server.api.errors import bad_request
from server.api.routing import Query, comma_list, json_out, principal_of, route, server_of
from server.services import access
from server.db import tables

_GROUPS = {"day": tables.Usage.day, "key": tables.Usage.api_key_name, "model": tables.Usage.model_name}
_FIELDS = {"day": "day", "key": "api_key", "model": "model"}


def _day(text: str | None, name: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise bad_request(f"{name} must be a date like 2026-01-31") from None


@route("GET", "/v2/usage", "Gateway usage: requests and tokens, summed by day, key and/or model",
       response=schemas.UsageRow, response_list=True,
       query={"by": Query("comma-separated groups: day,key,model (default all three)", comma_list(*_GROUPS)),
              "since": Query("first day, YYYY-MM-DD", {"type": "string", "format": "date"}),
              "until": Query("last day, YYYY-MM-DD", {"type": "string", "format": "date"})})
async def usage(request: web.Request) -> web.Response:
    groups = [g for g in request.query.get("by", "day,key,model").split(",") if g]
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown or not groups:
        raise bad_request(f"unknown grouping {unknown}; choose from day, key, model")
    since, until = _day(request.query.get("since"), "since"), _day(request.query.get("until"), "until")
    columns = [_GROUPS[g].label(g) for g in groups]
    query = select(*columns, func.sum(tables.Usage.requests), func.sum(tables.Usage.prompt_tokens),
                   func.sum(tables.Usage.completion_tokens)).group_by(*columns).order_by(*columns)
    principal = principal_of(request)
    if not access.runs_cluster(principal):  # members: the usage of their own keys
        query = query.where(tables.Usage.user_id == principal.user_id)
    if since:
        query = query.where(tables.Usage.day >= since)
    if until:
        query = query.where(tables.Usage.day <= until)
    server = server_of(request)
    await server.usage.flush()  # include what the gateway counted in the last seconds
    async with server.db.session() as s:
        rows = (await s.execute(query)).all()
    items = []
    for row in rows:
        values = dict(zip(groups, row[: len(groups)]))
        items.append(schemas.UsageRow(**{_FIELDS[g]: v for g, v in values.items()}, requests=int(row[-3] or 0),
                                      prompt_tokens=int(row[-2] or 0), completion_tokens=int(row[-1] or 0)))
    return json_out(items)
