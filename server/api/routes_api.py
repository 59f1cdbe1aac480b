"""`/v2/routes`: model routes (aliases weighted between models, with fallbacks). Not to be confused
with server/api/routing.py, the HTTP route table. The rules live in server/services/routes.py."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from server import schemas
from server.api.errors import bad_request, conflict, read_json
from server.api.permissions import only_visible, team_row
from server.api.resources import team_for_new_model
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.services import routes as rules


async def _route(request: web.Request, session, name: str, write: bool = False) -> tables.ModelRoute:
    return await team_row(request, session, tables.ModelRoute, tables.ModelRoute.name == name, f"route {name!r}", write)


async def _check_targets(session, team: str | None, targets: list[schemas.RouteTarget], fallbacks: list[str]) -> None:
    problems = await rules.target_problems(session, team, targets, fallbacks)
    if problems:
        raise bad_request("a route's targets and fallbacks must be models of its team: "
                          + "; ".join(f"{p['field']}: {p['message']}" for p in problems), problems)


@route("GET", "/v2/routes", "List the model routes of your teams (every route for admins and operators)",
       response=schemas.RouteOut, response_list=True)
async def list_routes(request: web.Request) -> web.Response:
    query = only_visible(request, select(tables.ModelRoute).order_by(tables.ModelRoute.name), tables.ModelRoute.team)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
    return json_out([schemas.RouteOut.model_validate(r) for r in rows])


@route("POST", "/v2/routes", "Create a model route: an alias clients call like a model", body=schemas.RouteCreate,
       response=schemas.RouteOut, status=201)
async def create_route(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.RouteCreate)
    async with server_of(request).db.session() as s:
        team = await team_for_new_model(request, s, body.team)
        if await rules.name_taken_by_model(s, body.name):
            raise conflict(f"{body.name!r} is a model: a route needs a name no model has")
        if await rules.name_taken_by_route(s, body.name):
            raise conflict(f"route {body.name!r} already exists")
        await _check_targets(s, team, body.targets, body.fallbacks)
        row = tables.ModelRoute(**rules.route_row(body.name, team, body.targets, body.fallbacks))
        s.add(row)
        try:
            await s.flush()
        except IntegrityError:
            raise conflict(f"route {body.name!r} already exists") from None
        record_event(s, "routes", row, "Created", rules.describe_targets(row.targets, row.fallbacks),
                     principal_of(request).name)
        await s.commit()
        return json_out(schemas.RouteOut.model_validate(row), status=201)


@route("GET", "/v2/routes/{name}", "Get a model route", response=schemas.RouteOut)
async def read_route(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        return json_out(schemas.RouteOut.model_validate(await _route(request, s, request.match_info["name"])))


@route("PATCH", "/v2/routes/{name}", "Change a route's targets, weights or fallbacks", body=schemas.RouteUpdate,
       response=schemas.RouteOut)
async def update_route(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.RouteUpdate)
    async with server_of(request).db.session() as s:
        row = await _route(request, s, request.match_info["name"], write=True)
        targets = body.targets if body.targets is not None else [schemas.RouteTarget(**t) for t in row.targets]
        fallbacks = body.fallbacks if body.fallbacks is not None else list(row.fallbacks)
        try:  # the pair as a whole: a model may appear once among both
            schemas.RouteCreate(name=row.name, targets=targets, fallbacks=fallbacks)
        except ValueError as exc:
            raise bad_request(str(exc).splitlines()[-1].strip()) from None
        await _check_targets(s, row.team, targets, fallbacks)
        new = rules.route_row(row.name, row.team, targets, fallbacks)
        if (new["targets"], new["fallbacks"]) != (row.targets, row.fallbacks):
            row.targets, row.fallbacks = new["targets"], new["fallbacks"]
            record_event(s, "routes", row, "Updated", rules.describe_targets(row.targets, row.fallbacks),
                         principal_of(request).name)
            await s.commit()
        return json_out(schemas.RouteOut.model_validate(row))


@route("DELETE", "/v2/routes/{name}", "Delete a model route (its targets stay)", response=schemas.RouteOut)
async def delete_route(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        row = await _route(request, s, request.match_info["name"], write=True)
        out = schemas.RouteOut.model_validate(row)
        await s.delete(row)
        record_event(s, "routes", row, "Deleted", "", principal_of(request).name)
        await s.commit()
        return json_out(out)
