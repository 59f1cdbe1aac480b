"""REST for gateway limits: set them on a key, a team or a model (PATCH .../limits: the fields given
change, null removes one), list them with what they use now (GET /v2/limits). The rules of who may
are in server/services/limits.py; server/gateway/limits.py enforces them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.errors import ApiError, forbidden, not_found, read_json
from server.api.permissions import require_team
from server.api.routing import Query, json_out, one_of, principal_of, route, server_of
from server.db import tables
from server.db.database import to_wire
from server.events import record_event
from server.schemas.limits import LIMIT_FIELDS, Limits, LimitsListed, LimitsOut, LimitsSet
from server.services import access
from server.services import limits as rules

_USER_QUERY = {"user": Query("the key's owner (admin; default: you)",
                             {"type": "string", "minLength": 1, "maxLength": 100})}


@route("GET", "/v2/limits", "List the gateway limits you may read (your keys', your teams' and their models'; "
       "every one for admins and operators), with what each uses now", response=LimitsListed, response_list=True,
       query={"scope": Query("only limits of keys, teams or models", one_of("key", "team", "model"))})
async def list_limits(request: web.Request) -> web.Response:
    principal = principal_of(request)
    server = server_of(request)
    scope = request.query.get("scope")
    query = (select(tables.GatewayLimit, tables.ApiKey.name, tables.ApiKey.user_id, tables.User.username,
                    tables.Model.team)
             .outerjoin(tables.ApiKey, tables.ApiKey.id == tables.GatewayLimit.api_key_id)
             .outerjoin(tables.User, tables.User.id == tables.ApiKey.user_id)
             .outerjoin(tables.Model, tables.Model.name == tables.GatewayLimit.model)
             .order_by(tables.GatewayLimit.scope, tables.GatewayLimit.id))
    if scope:
        query = query.where(tables.GatewayLimit.scope == scope)
    async with server.db.session() as s:
        found = (await s.execute(query)).all()
    items = []
    for row, key_name, owner_id, owner, model_team in found:
        team = row.team if row.scope == "team" else model_team
        limits = LimitsOut.model_validate(row)
        if not limits.any() or not rules.may_read(principal, row.scope, owner_id, team):
            continue
        items.append(_listed(server, limits, key_name or "", owner))
    return json_out(items)


def _listed(server: Any, limits: LimitsOut, key_name: str, owner: str | None) -> LimitsListed:
    subject = {"key": key_name, "team": limits.team, "model": limits.model}[limits.scope]
    in_memory = limits.api_key_id if limits.scope == "key" else subject
    return LimitsListed(**limits.model_dump(), subject=subject or "", owner=owner if limits.scope == "key" else None,
                        usage=server.limits.usage_of(limits.scope, in_memory))


async def _set(request: web.Request, s: Any, scope: str, where: dict[str, Any], event_kind: str, obj: Any,
               key_name: str = "", owner: str | None = None) -> web.Response:
    body = await read_json(request, LimitsSet)
    server = server_of(request)
    column = getattr(tables.GatewayLimit, next(iter(where)))
    row = (await s.execute(select(tables.GatewayLimit).where(column == next(iter(where.values()))))).scalar_one_or_none()
    current = Limits.model_validate(row) if row is not None else Limits()
    new = rules.merged(current, body)
    if row is None:
        row = tables.GatewayLimit(scope=scope, **where)
        s.add(row)
    for name in LIMIT_FIELDS:
        setattr(row, name, getattr(new, name))
    if new != current:
        record_event(s, event_kind, obj, "LimitsSet", rules.summary(new), principal_of(request).name)
    await s.commit()
    wire = to_wire(row)
    server.limits.apply("updated", wire)  # at once here; other servers hear it through the change feed
    return json_out(_listed(server, LimitsOut.model_validate(wire), key_name, owner))


@route("PATCH", "/v2/keys/{name}/limits", "Set an API key's limits: rpm, tpm, max_concurrency, budget_day, "
       "budget_month (null removes one; fields left out stay); yours, or (admins, ?user=NAME) another user's",
       body=LimitsSet, response=LimitsListed, query=_USER_QUERY)
async def set_key_limits(request: web.Request) -> web.Response:
    principal = principal_of(request)
    name = request.match_info["name"]
    username = request.query.get("user", principal.name)  # "" names nobody: a 404, as for key listings
    async with server_of(request).db.session() as s:
        owner_id = principal.user_id
        if username != principal.name:
            if not access.is_admin(principal):
                raise forbidden("only an admin may set another user's key limits")
            owner_id = await s.scalar(select(tables.User.id).where(tables.User.username == username))
            if owner_id is None:
                raise not_found(f"user {username!r}")
        key = (await s.execute(select(tables.ApiKey).where(
            tables.ApiKey.user_id == owner_id, tables.ApiKey.kind == "api",
            tables.ApiKey.name == name))).scalar_one_or_none()
        if key is None:
            raise not_found(f"API key {name!r}")
        if (refused := rules.may_set(principal, "key", key.user_id)) is not None:
            raise forbidden(f"only an admin may {refused}")
        return await _set(request, s, "key", {"api_key_id": key.id}, "api_keys", key, key.name, username)


@route("PATCH", "/v2/teams/{name}/limits", "Set a team's limits for the requests to its models (admin): rpm, tpm, "
       "max_concurrency, budget_day, budget_month (null removes one; fields left out stay)",
       body=LimitsSet, response=LimitsListed)
async def set_team_limits(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if (refused := rules.may_set(principal_of(request), "team")) is not None:
        raise forbidden(f"only an admin may {refused}")
    async with server_of(request).db.session() as s:
        team = (await s.execute(select(tables.Team).where(tables.Team.name == name))).scalar_one_or_none()
        if team is None:
            raise not_found(f"team {name!r}")
        return await _set(request, s, "team", {"team": name}, "teams",
                          SimpleNamespace(id=team.id, name=name, team=name))


@route("PATCH", "/v2/models/{name}/limits", "Set a model's limits (admins and operators): rpm, tpm, "
       "max_concurrency, budget_day, budget_month (null removes one; fields left out stay)",
       body=LimitsSet, response=LimitsListed)
async def set_model_limits(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        model = (await s.execute(select(tables.Model).where(tables.Model.name == name))).scalar_one_or_none()
        if model is None:
            raise not_found(f"model {name!r}")
        require_team(request, model.team, f"model {name!r}")
        if (refused := rules.may_set(principal_of(request), "model")) is not None:
            raise ApiError(403, "forbidden", f"only admins and operators may {refused}")
        return await _set(request, s, "model", {"model": name}, "models", model)
