"""Team secrets: set, list and delete them (team members); the agent running an instance reads the
values its env names (server/services/secrets.py keeps them encrypted)."""

from __future__ import annotations

import re

from aiohttp import web
from sqlalchemy import select

from server import schemas
from server.api.errors import ApiError, conflict, not_found, parse_whole_number, read_json
from server.api.permissions import require_team
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.services import secrets
from server.services.secrets import SecretBox, SecretsUnavailable


async def box_of(request: web.Request, session) -> SecretBox:
    server = server_of(request)
    if server.secret_box is None:
        server.secret_box = await SecretBox.open(session, server.config.data_dir)
    return server.secret_box


def _unavailable(exc: SecretsUnavailable) -> ApiError:
    return ApiError(503, "secrets_unavailable", str(exc))


async def _team(request: web.Request, session, write: bool) -> str:
    team = request.match_info["team"]
    if await session.scalar(select(tables.Team.id).where(tables.Team.name == team)) is None:
        raise not_found(f"team {team!r}")
    require_team(request, team, f"team {team!r}", write)
    return team


@route("GET", "/v2/teams/{team}/secrets", "List a team's secrets (names only)", response=schemas.SecretOut,
       response_list=True)
async def list_secrets(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        team = await _team(request, s, write=False)
        rows = (await s.execute(select(tables.Secret).where(tables.Secret.team == team)
                                .order_by(tables.Secret.name))).scalars().all()
        return json_out([schemas.SecretOut.model_validate(r) for r in rows])


@route("PUT", "/v2/teams/{team}/secrets/{name}", "Set a team secret (its members); models name it in env as "
       "{secret: NAME}", body=schemas.SecretSet, response=schemas.SecretOut)
async def set_secret(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.SecretSet)
    name = request.match_info["name"]
    if not re.fullmatch(schemas.SECRET_NAME_PATTERN, name):
        raise ApiError(400, "bad_request", "a secret's name: letters, digits, '.', '_', '-' (at most 100)")
    async with server_of(request).db.session() as s:
        team = await _team(request, s, write=True)
        try:
            sealed = (await box_of(request, s)).seal(body.value)
        except SecretsUnavailable as exc:
            raise _unavailable(exc) from None
        row = (await s.execute(select(tables.Secret).where(tables.Secret.team == team, tables.Secret.name == name))
               ).scalar_one_or_none()
        if row is None:
            row = tables.Secret(team=team, name=name, ciphertext=sealed)
            s.add(row)
        else:
            row.ciphertext = sealed
        await s.flush()
        record_event(s, "secrets", row, "SecretSet", f"secret {name} of team {team} set", principal_of(request).name)
        await s.commit()
        return json_out(schemas.SecretOut.model_validate(row))


@route("DELETE", "/v2/teams/{team}/secrets/{name}", "Delete a team secret no model names (its members)")
async def delete_secret(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        team = await _team(request, s, write=True)
        row = (await s.execute(select(tables.Secret).where(tables.Secret.team == team, tables.Secret.name == name))
               ).scalar_one_or_none()
        if row is None:
            raise not_found(f"secret {name!r} of team {team!r}")
        users = [m.name for m in (await s.execute(select(tables.Model).where(tables.Model.team == team))).scalars()
                 if name in secrets.referenced(m.spec.get("env") or {}).values()]
        if users:
            raise conflict(f"secret {name!r} is named by models {', '.join(users)}: change their env first")
        await s.delete(row)
        record_event(s, "secrets", row, "SecretDeleted", f"secret {name} of team {team} deleted",
                     principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": name})


@route("GET", "/v2/agent/instances/{id}/secrets", "The values of the secrets an instance's env names (its worker)",
       auth="worker", response=schemas.InstanceSecrets)
async def instance_secrets(request: web.Request) -> web.Response:
    worker_id = principal_of(request).worker_id
    instance_id = parse_whole_number(request.match_info["id"], low=1)
    async with server_of(request).db.session() as s:
        instance = await s.get(tables.ModelInstance, instance_id) if instance_id else None
        if instance is None or instance.worker_id != worker_id:
            raise not_found(f"instance {request.match_info['id']!r} on this worker")
        refs = secrets.referenced(instance.spec.get("env") or {})
        try:
            plain = await secrets.values(s, await box_of(request, s), instance.team, refs)
        except KeyError as exc:
            raise not_found(f"secrets {exc.args[0]} of team {instance.team!r}") from None
        except SecretsUnavailable as exc:
            raise _unavailable(exc) from None
    return json_out(schemas.InstanceSecrets(env=plain))
