"""REST handlers for what operators manage: models, instances, workers, keys, events, login."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
from aiohttp import web
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from server import schemas
from server.api.errors import (ApiError, bad_request, conflict, forbidden, not_found, parse_whole_number, read_json,
                               unauthorized)
from server.api.permissions import only_visible, require_cluster_role, require_team, team_row
from server.api.routing import Query, integer, json_out, one_of, principal_of, route, server_of
from server.api.security import (SESSION_LIFETIME, Principal, hash_secret, new_user_token,
                                 verify_password_or_nobody)
from server.db import tables
from server.events import record_event
from server.schemas.backend_traits import describe
from server.services import access, routes
from server.services import models as model_specs

# --- login and keys -------------------------------------------------------------


@route("POST", "/v2/auth/login", "Exchange a username and password for a session token", auth="none",
       body=schemas.LoginRequest, response=schemas.LoginResponse)
async def login(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.LoginRequest)
    server = server_of(request)
    address = request.remote or ""
    if (wait := server.login_throttle.retry_after(body.username, address)) > 0:
        raise ApiError(429, "too_many_attempts", f"too many failed logins; try again in {wait:.0f} s",
                       headers={"Retry-After": str(max(1, round(wait)))})
    now = datetime.now(UTC)
    async with server.db.session() as s:
        user = (await s.execute(select(tables.User).where(tables.User.username == body.username))).scalar_one_or_none()
        # The same scrypt work for a user that does not exist: the answer's time says nothing.
        valid = await asyncio.to_thread(verify_password_or_nobody, body.password, user.password_hash if user else None)
        if not valid:
            server.login_throttle.failed(body.username, address)
            raise unauthorized("wrong username or password")
        if user.disabled:
            raise forbidden(f"user {user.username} is disabled; an admin can enable it again")
        server.login_throttle.succeeded(body.username)
        await s.execute(delete(tables.ApiKey).where(tables.ApiKey.kind == "session", tables.ApiKey.expires_at < now))
        token, prefix = new_user_token()
        expires = now + SESSION_LIFETIME
        s.add(tables.ApiKey(user_id=user.id, kind="session", name=f"session-{prefix}", prefix=prefix,
                            secret_hash=hash_secret(token), expires_at=expires))
        await s.commit()
    return json_out(schemas.LoginResponse(token=token, username=body.username, expires_at=expires))


async def _owner(request: web.Request, session, username: str | None) -> int:
    """The user whose keys or sessions a request means: the caller, or (admins) the one named."""
    principal = principal_of(request)
    if username is None or username == principal.name:
        return principal.user_id
    if not access.is_admin(principal):
        raise forbidden("only an admin may see or revoke another user's keys and sessions")
    user_id = await session.scalar(select(tables.User.id).where(tables.User.username == username))
    if user_id is None:
        raise not_found(f"user {username!r}")
    return user_id


async def _credentials(request: web.Request, what: str, *where) -> list:
    """(key row, owner's name) of the caller's credentials; with ?all=1, every user's (admins only)."""
    principal = principal_of(request)
    query = (select(tables.ApiKey, tables.User.username).join(tables.User).where(*where)
             .order_by(tables.User.username, tables.ApiKey.id))
    if request.query.get("all") == "1":
        if not access.is_admin(principal):
            raise forbidden(f"only an admin may list every user's {what}")
    else:
        query = query.where(tables.ApiKey.user_id == principal.user_id)
    async with server_of(request).db.session() as s:
        return list((await s.execute(query)).all())


@route("GET", "/v2/keys", "List your API keys (admins: ?all=1 lists everyone's, with their owner)",
       response=schemas.ApiKeyListed, response_list=True,
       query={"all": Query("1: every user's keys (admin)", one_of("0", "1"))})
async def list_keys(request: web.Request) -> web.Response:
    rows = await _credentials(request, "keys", tables.ApiKey.kind == "api")
    return json_out([schemas.ApiKeyListed(**schemas.ApiKeyOut.model_validate(key).model_dump(), owner=owner)
                         for key, owner in rows])


@route("POST", "/v2/keys", "Create an API key; the secret is returned once", body=schemas.ApiKeyCreate,
       response=schemas.ApiKeyCreated, status=201)
async def create_key(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.ApiKeyCreate)
    principal = principal_of(request)
    token, prefix = new_user_token()
    expires = datetime.now(UTC) + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    async with server_of(request).db.session() as s:
        exists = (await s.execute(select(tables.ApiKey.id).where(
            tables.ApiKey.user_id == principal.user_id, tables.ApiKey.kind == "api", tables.ApiKey.name == body.name))).first()
        if exists:
            raise conflict(f"an API key named {body.name!r} already exists")
        key = tables.ApiKey(user_id=principal.user_id, kind="api", name=body.name, prefix=prefix,
                            secret_hash=hash_secret(token), expires_at=expires, scopes=list(dict.fromkeys(body.scopes)),
                            allowed_models=list(dict.fromkeys(body.allowed_models)))
        s.add(key)
        await s.flush()
        record_event(s, "api_keys", key, "Created", f"API key {body.name} created", principal.name)
        await s.commit()
        out = schemas.ApiKeyCreated(**schemas.ApiKeyOut.model_validate(key).model_dump(), key=token)
    return json_out(out, status=201)


@route("DELETE", "/v2/keys/{name}", "Revoke an API key (admins: ?user=NAME revokes another user's)",
       query={"user": Query("the key's owner (admin; default: you)", {"type": "string", "minLength": 1,
                                                                          "maxLength": 100})})
async def delete_key(request: web.Request) -> web.Response:
    principal = principal_of(request)
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        owner = await _owner(request, s, request.query.get("user"))
        key = (await s.execute(select(tables.ApiKey).where(
            tables.ApiKey.user_id == owner, tables.ApiKey.kind == "api", tables.ApiKey.name == name))).scalar_one_or_none()
        if key is None:
            raise not_found(f"API key {name!r}")
        await s.delete(key)
        record_event(s, "api_keys", key, "Revoked", f"API key {name} revoked", principal.name)
        await s.commit()
    server_of(request).auth.invalidate()  # at once here; other servers hear it through the change feed
    return web.json_response({"deleted": name})


def _session_kind(key: tables.ApiKey) -> str:
    return "ssh" if key.name.startswith("ssh-") else "login"


@route("GET", "/v2/sessions", "List your login sessions (admins: ?all=1 lists everyone's)",
       response=schemas.SessionOut, response_list=True,
       query={"all": Query("1: every user's sessions (admin)", one_of("0", "1"))})
async def list_sessions(request: web.Request) -> web.Response:
    rows = await _credentials(request, "sessions", tables.ApiKey.kind == "session",
                              tables.ApiKey.expires_at >= datetime.now(UTC))
    return json_out([schemas.SessionOut(prefix=key.prefix, username=owner, kind=_session_kind(key),
                                        created_at=key.created_at, expires_at=key.expires_at,
                                        last_used_at=key.last_used_at) for key, owner in rows])


@route("DELETE", "/v2/sessions/{prefix}", "Revoke a login session: yours, or anyone's for admins")
async def revoke_session(request: web.Request) -> web.Response:
    principal = principal_of(request)
    prefix = request.match_info["prefix"]
    async with server_of(request).db.session() as s:
        row = (await s.execute(select(tables.ApiKey, tables.User).join(tables.User).where(
            tables.ApiKey.kind == "session", tables.ApiKey.prefix == prefix))).first()
        if row is None or (row[1].id != principal.user_id and not access.is_admin(principal)):
            raise not_found(f"session {prefix!r}")
        key, user = row
        await s.delete(key)
        record_event(s, "users", user, "SessionRevoked", f"session {prefix} of {user.username} revoked", principal.name)
        await s.commit()
    server_of(request).auth.invalidate()
    return web.json_response({"deleted": prefix})


# --- models -----------------------------------------------------------------


async def check_spec(request: web.Request, session, spec: schemas.ModelSpec, team: str | None) -> None:
    """A 400 naming each field of `spec` this caller may not ask the workers for in `team`
    (server/services/models.py)."""
    server = server_of(request)
    problems = await model_specs.check_spec(session, spec, admin=access.runs_cluster(principal_of(request)),
                                            model_roots=server.config.local_model_roots(), team=team)
    if problems:
        raise ApiError(400, "spec_refused", describe(problems),
                       details=[{"field": p.field, "message": p.message} for p in problems])


def new_revision(session, model: tables.Model, spec: dict, change: str) -> None:
    """A new generation with this spec: instances of older ones are rolled over."""
    model.spec = spec
    model.generation += 1
    model.rollout_message = ""
    session.add(tables.ModelRevision(model_id=model.id, revision=model.generation, spec=spec, change=change))


async def ready_counts(session, model_ids: list[int] | None = None) -> dict[int, int]:
    query = (select(tables.ModelInstance.model_id, func.count())
             .where(tables.ModelInstance.state == schemas.InstanceState.running)
             .group_by(tables.ModelInstance.model_id))
    if model_ids is not None:
        query = query.where(tables.ModelInstance.model_id.in_(model_ids))
    return {model_id: count for model_id, count in (await session.execute(query)).all()}


def redacted_spec(spec: schemas.ModelSpec, caller: Principal, team: str | None) -> schemas.ModelSpec:
    """Env values only for admins and the owning team's members (server/services/access.py)."""
    if not spec.env or access.sees_secrets(caller, team):
        return spec
    return spec.model_copy(update={"env": access.redact_env(spec.env)})


def model_out(model: tables.Model, ready: dict[int, int], caller: Principal) -> schemas.ModelOut:
    out = schemas.ModelOut.model_validate(model)
    out.ready_replicas = ready.get(model.id, 0)
    out.spec = redacted_spec(out.spec, caller, model.team)
    return out


async def get_model(request: web.Request, session, name: str, write: bool = False) -> tables.Model:
    """The model `name` if the caller may see it (and change it, with `write`)."""
    return await team_row(request, session, tables.Model, tables.Model.name == name, f"model {name!r}", write)


async def team_for_new_model(request: web.Request, session, team: str | None) -> str:
    """The team a new model goes to: as asked, else the caller's only team where it may deploy
    (`default` for admins and operators)."""
    caller = principal_of(request)
    if team is None:
        if access.runs_cluster(caller):
            team = schemas.DEFAULT_TEAM
        else:
            writable = [t for t, _ in caller.teams if access.team_access(caller, t) == "write"]
            if len(writable) != 1:
                raise bad_request("name the team that owns the model (team): you may deploy to "
                                  + (", ".join(writable) or "no team; ask an admin to add you to one"))
            team = writable[0]
    if await session.scalar(select(tables.Team.id).where(tables.Team.name == team)) is None:
        raise not_found(f"team {team!r}")
    require_team(request, team, f"team {team!r}", write=True)
    return team


@route("GET", "/v2/models", "List the models of your teams (every model for admins and operators)",
       response=schemas.ModelOut, response_list=True)
async def list_models(request: web.Request) -> web.Response:
    query = select(tables.Model).order_by(tables.Model.name)
    query = only_visible(request, query, tables.Model.team)
    async with server_of(request).db.session() as s:
        models = (await s.execute(query)).scalars().all()
        ready = await ready_counts(s)
    caller = principal_of(request)
    return json_out([model_out(m, ready, caller) for m in models])


@route("POST", "/v2/models", "Deploy a model", body=schemas.ModelCreate, response=schemas.ModelOut, status=201)
async def create_model(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.ModelCreate)
    principal = principal_of(request)
    spec = schemas.ModelSpec.model_validate(body.model_dump(exclude=schemas.MODEL_POLICY_FIELDS))
    async with server_of(request).db.session() as s:
        team = await team_for_new_model(request, s, body.team)
        await check_spec(request, s, spec, team)
        existing = (await s.execute(select(tables.Model).where(tables.Model.name == body.name))).scalar_one_or_none()
        if existing is not None:
            what = "is being deleted" if existing.state == schemas.ModelState.deleting else "already exists"
            raise conflict(f"model {body.name!r} {what}")
        if await routes.name_taken_by_route(s, body.name):  # clients send either name as `model`
            raise conflict(f"{body.name!r} is a model route: a model needs a name no route has")
        model = tables.Model(name=body.name, spec=spec.model_dump(mode="json"), replicas=body.replicas, generation=1,
                             max_surge=body.max_surge, max_unavailable=body.max_unavailable, team=team)
        model_specs.scaling_changes(model, body, server_of(request).config.priority_ranks())
        s.add(model)
        try:
            await s.flush()
        except IntegrityError:
            raise conflict(f"model {body.name!r} already exists") from None
        s.add(tables.ModelRevision(model_id=model.id, revision=1, spec=model.spec, change="created"))
        record_event(s, "models", model, "Created", f"{body.backend} from {body.source}, {body.replicas} replicas; "
                     + model_specs.scaling_summary(model), principal.name)
        await s.commit()
    return json_out(model_out(model, {}, principal), status=201)


@route("GET", "/v2/models/{name}", "Get a model", response=schemas.ModelOut)
async def read_model(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"])
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal_of(request)))


@route("PATCH", "/v2/models/{name}", "Scale a model or change its spec (a new generation)",
       body=schemas.ModelUpdate, response=schemas.ModelOut)
async def update_model(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.ModelUpdate)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"], write=True)
        if model.state == schemas.ModelState.deleting:
            raise conflict(f"model {model.name!r} is being deleted")
        changes = body.model_dump(exclude_unset=True, exclude=schemas.MODEL_POLICY_FIELDS)
        surge = model.max_surge if body.max_surge is None else body.max_surge
        unavailable = model.max_unavailable if body.max_unavailable is None else body.max_unavailable
        if surge == 0 and unavailable == 0:
            raise ApiError(422, "invalid", "max_surge and max_unavailable cannot both be 0: a rollout could never progress")
        model.max_surge, model.max_unavailable = surge, unavailable
        if changes:
            new_spec = schemas.ModelSpec.model_validate({**model.spec, **changes})
            await check_spec(request, s, new_spec, model.team)
            dumped = new_spec.model_dump(mode="json")
            if dumped != model.spec:
                new_revision(s, model, dumped, "spec changed: " + ", ".join(sorted(changes)))
                record_event(s, "models", model, "SpecChanged", f"generation {model.generation}", principal.name)
        if body.replicas is not None and body.replicas != model.replicas:
            record_event(s, "models", model, "Scaled", f"{model.replicas} -> {body.replicas} replicas", principal.name)
            model.replicas = body.replicas
        if scaled := model_specs.scaling_changes(model, body, server_of(request).config.priority_ranks()):
            record_event(s, "models", model, "ScalingChanged", "; ".join(scaled) + " (" + model_specs.scaling_summary(model)
                         + ")", principal.name)
        await s.commit()
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal))


@route("DELETE", "/v2/models/{name}", "Delete a model and stop its instances", response=schemas.ModelOut, status=202)
async def delete_model(request: web.Request) -> web.Response:
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"], write=True)
        if model.state != schemas.ModelState.deleting:
            model.state = schemas.ModelState.deleting
            record_event(s, "models", model, "Deleting", "instances are being stopped", principal.name)
            await s.commit()
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal), status=202)


# --- instances ----------------------------------------------------------------


async def get_instance(request: web.Request, session, ref: str, write: bool = False) -> tables.ModelInstance:
    """The instance `ref` (an id or a name) if the caller may see it (and act on it, with `write`)."""
    instance_id = parse_whole_number(ref, low=1)
    column = tables.ModelInstance.name if instance_id is None else tables.ModelInstance.id
    value = ref if instance_id is None else instance_id
    return await team_row(request, session, tables.ModelInstance, column == value, f"instance {ref!r}", write)


def instance_out(instance: tables.ModelInstance, caller: Principal) -> schemas.InstanceOut:
    out = schemas.InstanceOut.model_validate(instance)
    out.spec = redacted_spec(out.spec, caller, instance.team)
    return out


@route("GET", "/v2/instances", "List the instances of your teams' models (every one for admins and operators)",
       response=schemas.InstanceOut, response_list=True,
       query={"model": "only instances of this model", "worker": "only instances on this worker"})
async def list_instances(request: web.Request) -> web.Response:
    query = select(tables.ModelInstance).order_by(tables.ModelInstance.id)
    if model := request.query.get("model"):
        query = query.where(tables.ModelInstance.model_name == model)
    if worker := request.query.get("worker"):
        query = query.where(tables.ModelInstance.worker_name == worker)
    query = only_visible(request, query, tables.ModelInstance.team)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
    caller = principal_of(request)
    return json_out([instance_out(r, caller) for r in rows])


@route("GET", "/v2/instances/{ref}", "Get an instance by id or name", response=schemas.InstanceOut)
async def read_instance(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        return json_out(instance_out(await get_instance(request, s, request.match_info["ref"]), principal_of(request)))


@route("DELETE", "/v2/instances/{ref}", "Stop an instance (the model controller replaces it)",
       response=schemas.InstanceOut, status=202)
async def delete_instance(request: web.Request) -> web.Response:
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        instance = await get_instance(request, s, request.match_info["ref"], write=True)
        if instance.state != schemas.InstanceState.terminating:
            instance.state = schemas.InstanceState.terminating
            instance.state_message = f"deleted by {principal.name}"
            record_event(s, "instances", instance, "Deleting", instance.state_message, principal.name)
            await s.commit()
        return json_out(instance_out(instance, principal), status=202)


@route("GET", "/v2/instances/{ref}/logs", "The instance's log, from its agent (text; chunked with follow=1)",
       query={"tail": Query("last N lines (default 200; -1: everything)", integer(-1, 10_000_000, 200)),
              "follow": Query("1 to keep streaming", one_of("0", "1")),
              "previous": Query("1 for the log of the previous run", one_of("0", "1"))},
       content={"text/plain": None}, also=(502,))
async def instance_logs(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    tail = parse_whole_number(request.query.get("tail", "200"), low=-1, high=10_000_000)
    follow = request.query.get("follow", "0")
    previous = request.query.get("previous", "0")
    if tail is None:
        raise bad_request("tail must be a whole number from -1 (everything) to 10000000")
    async with server.db.session() as s:
        # Logs may hold what the env had: the team's members (and admins, operators) only, not its viewers.
        instance = await get_instance(request, s, request.match_info["ref"], write=True)
        worker = await s.get(tables.Worker, instance.worker_id) if instance.worker_id else None
    if worker is None:
        raise ApiError(409, "not_scheduled", f"instance {instance.name} has no worker yet, so it has no log")
    url = f"http://{worker.address}:{worker.agent_port}/instances/{instance.id}/logs"
    headers = {"Authorization": f"Bearer {worker.agent_secret}"}
    try:
        upstream = await server.http.get(url, params={"tail": str(tail), "follow": follow, "previous": previous}, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
    except aiohttp.ClientError as exc:
        raise ApiError(502, "worker_unreachable", f"worker {worker.name} did not answer: {exc}") from None
    async with upstream:
        if upstream.status != 200:
            raise ApiError(upstream.status if upstream.status < 500 else 502, "agent_error", await upstream.text())
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the reader left (e.g. Ctrl-C on `logs -f`)
            pass
        return response


# --- workers ------------------------------------------------------------------


@route("GET", "/v2/workers", "List workers", response=schemas.WorkerOut, response_list=True)
async def list_workers(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        rows = (await s.execute(select(tables.Worker).order_by(tables.Worker.name))).scalars().all()
    return json_out([schemas.WorkerOut.model_validate(r) for r in rows])


async def _get_worker(session, name: str) -> tables.Worker:
    worker = (await session.execute(select(tables.Worker).where(tables.Worker.name == name))).scalar_one_or_none()
    if worker is None:
        raise not_found(f"worker {name!r}")
    return worker


@route("GET", "/v2/workers/{name}", "Get a worker", response=schemas.WorkerOut)
async def read_worker(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        return json_out(schemas.WorkerOut.model_validate(await _get_worker(s, request.match_info["name"])))


@route("DELETE", "/v2/workers/{name}", "Remove a worker; its instances are rescheduled")
async def delete_worker(request: web.Request) -> web.Response:
    require_cluster_role(request, "remove workers")
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        worker = await _get_worker(s, request.match_info["name"])
        instances = (await s.execute(select(tables.ModelInstance).where(
            tables.ModelInstance.worker_id == worker.id))).scalars().all()
        for instance in instances:
            await s.delete(instance)  # the model controller creates replacements
        for cached in (await s.execute(select(tables.ModelFile).where(tables.ModelFile.worker_id == worker.id))).scalars():
            await s.delete(cached)  # one by one, so watchers (the TUI, the scheduler) see its files go
        await s.delete(worker)
        record_event(s, "workers", worker, "Removed", f"{len(instances)} instances dropped", principal.name)
        await s.commit()
    return web.json_response({"deleted": worker.name})


# --- events -------------------------------------------------------------------


@route("GET", "/v2/events", "Recent events, newest last", response=schemas.EventOut, response_list=True,
       query={"limit": Query("how many (default 100, at most 1000)", integer(1, 1000, 100)),
              "kind": "only events of this kind of object: models, instances, workers, api_keys, users, backends",
              "name": "only events of this object"})
async def list_events(request: web.Request) -> web.Response:
    limit = parse_whole_number(request.query.get("limit", "100"), low=1, high=1000)
    if limit is None:
        raise bad_request("limit must be a whole number from 1 to 1000")
    query = select(tables.Event).order_by(tables.Event.id.desc()).limit(limit)
    if kind := request.query.get("kind"):
        query = query.where(tables.Event.kind == kind)
    if name := request.query.get("name"):
        query = query.where(tables.Event.object_name == name)
    if (visible := access.event_clause(principal_of(request))) is not None:
        query = query.where(visible)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
    return json_out([schemas.EventOut.model_validate(r) for r in reversed(rows)])
