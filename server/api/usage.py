"""`GET /v2/usage`: gateway requests and tokens summed by day, hour, team, model, route, key and/or user.

A request through a model route counts under the model that served it, with the route beside it:
sums by model and by route each add up to the same total.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from aiohttp import web
from sqlalchemy import and_, func, or_, select

from server import schemas
from server.api.errors import bad_request
from server.api.routing import Query, comma_list, json_out, principal_of, route, server_of
from server.db import tables
from server.services import access

_U = tables.Usage
_GROUPS = {"day": _U.day, "hour": _U.hour, "team": _U.team, "model": _U.model_name, "route": _U.route,
           "key": _U.api_key_name, "user": tables.User.username}
_FIELDS = {"day": "day", "hour": "hour", "team": "team", "model": "model", "route": "route", "key": "api_key",
           "user": "user"}
_RELATIVE = re.compile(r"^([1-9][0-9]{0,4})([dh])$")
TIME_HELP = "YYYY-MM-DD, or relative to now: 7d (days), 24h (hours)"


def _moment(text: str | None, name: str, now: datetime) -> tuple[date, int] | None:
    """(day, hour) a bound names: a date (its first hour) or a span back from now."""
    if text is None:
        return None
    if match := _RELATIVE.match(text):
        amount, unit = int(match.group(1)), match.group(2)
        start = now - (timedelta(days=amount) if unit == "d" else timedelta(hours=amount))
        start = max(start, datetime(1, 1, 2, tzinfo=UTC))
        return (start.date(), start.hour) if unit == "h" else (start.date() + timedelta(days=1), 0)
    try:
        return date.fromisoformat(text), 0
    except ValueError:
        raise bad_request(f"{name} must be a date like 2026-01-31 or a span like 7d or 24h") from None


@route("GET", "/v2/usage", "Gateway usage: requests and tokens, summed by day, hour, team, model, route, key "
       "and/or user", response=schemas.UsageRow, response_list=True,
       query={"by": Query("comma-separated groups: " + ",".join(_GROUPS) + " (default day,key,model)",
                          comma_list(*_GROUPS)),
              "since": Query(f"first day or span back: {TIME_HELP}"),
              "until": Query("last day, YYYY-MM-DD", {"type": "string", "format": "date"})})
async def usage(request: web.Request) -> web.Response:
    groups = [g for g in request.query.get("by", "day,key,model").split(",") if g]
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown or not groups or len(set(groups)) != len(groups):
        raise bad_request(f"unknown or repeated grouping {unknown or groups}; choose from {', '.join(_GROUPS)}")
    now = datetime.now(UTC)
    since = _moment(request.query.get("since"), "since", now)
    until = request.query.get("until")
    until_day = _moment(until, "until", now)[0] if until is not None else None
    columns = [_GROUPS[g].label(g) for g in groups]
    query = (select(*columns, func.sum(_U.requests), func.sum(_U.prompt_tokens), func.sum(_U.completion_tokens))
             .select_from(_U).outerjoin(tables.User, tables.User.id == _U.user_id)
             .group_by(*columns).order_by(*columns))
    principal = principal_of(request)
    if not access.runs_cluster(principal):  # members: the usage of their own keys
        query = query.where(_U.user_id == principal.user_id)
    if since is not None:
        day, hour = since
        query = query.where(or_(_U.day > day, and_(_U.day == day, _U.hour >= hour)))
    if until_day is not None:
        query = query.where(_U.day <= until_day)
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
