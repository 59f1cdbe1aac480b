"""Backends: the built-in ones, and custom ones users register (`maas backend add -f FILE`).

A custom backend's definition is stored in the settings table under `backend/NAME` (JSON);
agents fetch the one an instance needs (`GET /v2/backends/NAME` with their worker token).
Registering one takes an admin or an operator: its command runs on every worker that serves it.
"""

from __future__ import annotations

import json

from aiohttp import web
from sqlalchemy import select

from server import schemas
from server.api.errors import conflict, not_found, read_json
from server.api.permissions import require_cluster_role
from server.api.routing import Query, json_out, one_of, principal_of, route, server_of
from server.db import tables
from server.db.settings import put_setting
from server.events import record_event
from server.schemas.backend_traits import BACKEND_TRAITS, BackendTraits
from server.services.backends import ALLOW_PREFIX, allow_lists, effective

SETTING_PREFIX = "backend/"

# How each built-in backend starts, for `maas backend list` (the agent's backends/ package builds the
# real command); what it accepts comes from the traits table.
_BUILTIN_COMMANDS: dict[str, tuple[list[str], str | None]] = {
    "llama.cpp": (["python", "-m", "agent.backends.llamacpp_server", "--model", "{model_path}", "--alias",
                   "{model_name}", "--host", "{host}", "--port", "{port}"], None),
    "vllm": (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model_path}",
              "--served-model-name", "{model_name}", "--host", "{host}", "--port", "{port}"], "vllm/vllm-openai:latest"),
    "sglang": (["python", "-m", "sglang.launch_server", "--model-path", "{model_path}", "--served-model-name",
                "{model_name}", "--host", "{host}", "--port", "{port}", "--enable-metrics"], "lmsysorg/sglang:latest"),
    "vox-box": (["vox-box", "start", "--model", "{model_path}", "--host", "{host}", "--port", "{port}"],
                "gpustack/vox-box:latest"),
    "mindie": (["/usr/local/Ascend/mindie/latest/mindie-service/bin/mindieservice_daemon"],
               "ascendhub.huawei.com/public-ascendhub/mindie"),
}


def _builtin(traits: BackendTraits, extra: schemas.BackendAllowList | None) -> schemas.BackendOut:
    command, image = _BUILTIN_COMMANDS[traits.name]
    env, args = effective(traits.name, extra)
    return schemas.BackendOut(
        name=traits.name, builtin=True, description=traits.description, command=command, image=image,
        health_path=traits.health_path, metrics_path=traits.metrics_path, metrics=dict(traits.metrics),
        allowed_env=sorted(env), allowed_args=sorted(args))


BUILTIN: list[schemas.BackendOut] = [_builtin(t, None) for t in BACKEND_TRAITS.values()]


def _out(row: tables.Setting, extra: schemas.BackendAllowList | None = None) -> schemas.BackendOut:
    definition = json.loads(row.value)
    env, args = effective(schemas.CUSTOM_BACKEND_PREFIX + definition["name"], extra)
    return schemas.BackendOut(**definition, created_at=row.created_at, updated_at=row.updated_at,
                              allowed_env=sorted(env), allowed_args=sorted(args))


async def _custom_rows(session) -> list[tables.Setting]:
    query = select(tables.Setting).where(tables.Setting.key.startswith(SETTING_PREFIX, autoescape=True))
    return list((await session.execute(query.order_by(tables.Setting.key))).scalars())


def _require_backend_admin(request: web.Request) -> None:
    require_cluster_role(request, "register, remove or open up backends: their commands run on the workers")


@route("GET", "/v2/backends", "List the built-in backends and the custom ones (deploy those as custom:NAME)",
       auth="user_or_worker", response=schemas.BackendOut, response_list=True)
async def list_backends(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        extra = await allow_lists(s)
        rows = await _custom_rows(s)
    builtin = [_builtin(t, extra.get(t.name)) for t in BACKEND_TRAITS.values()]
    custom = [_out(row, extra.get(schemas.CUSTOM_BACKEND_PREFIX + row.key[len(SETTING_PREFIX):])) for row in rows]
    return json_out(builtin + custom)


@route("GET", "/v2/backends/{name}", "A custom backend's definition", auth="user_or_worker",
       response=schemas.BackendOut)
async def get_backend(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        row = await s.get(tables.Setting, SETTING_PREFIX + name)
        if row is None:
            raise not_found(f"custom backend {name!r}")
        return json_out(_out(row, (await allow_lists(s)).get(schemas.CUSTOM_BACKEND_PREFIX + name)))


@route("POST", "/v2/backends", "Register a custom backend (admins and operators)", body=schemas.BackendDefinition,
       response=schemas.BackendOut, status=201,
       query={"replace": Query("1 to replace a backend of that name", one_of("0", "1"))})
async def create_backend(request: web.Request) -> web.Response:
    _require_backend_admin(request)
    body = await read_json(request, schemas.BackendDefinition)
    replace = request.query.get("replace") == "1"
    async with server_of(request).db.session() as s:
        if not replace and await s.get(tables.Setting, SETTING_PREFIX + body.name) is not None:
            raise conflict(f"a backend named {body.name!r} is already registered (add ?replace=1 to change it)")
        row = await put_setting(s, SETTING_PREFIX + body.name, json.dumps(body.model_dump(mode="json")))
        await s.flush()
        record_event(s, "backends", body.name, "Registered", f"backend custom:{body.name}: {' '.join(body.command)[:500]}",
                     principal_of(request).name)
        await s.commit()
        await s.refresh(row)
        return json_out(_out(row), status=201)


@route("DELETE", "/v2/backends/{name}", "Remove a custom backend (admins and operators); running instances keep running")
async def delete_backend(request: web.Request) -> web.Response:
    _require_backend_admin(request)
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        row = await s.get(tables.Setting, SETTING_PREFIX + name)
        if row is None:
            raise not_found(f"custom backend {name!r}")
        await s.delete(row)
        if allow := await s.get(tables.Setting, ALLOW_PREFIX + schemas.CUSTOM_BACKEND_PREFIX + name):
            await s.delete(allow)
        record_event(s, "backends", name, "Removed", f"backend custom:{name}", principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": name})


@route("PUT", "/v2/backends/{name}/allow", "Set what members may pass to a backend (admins and operators): "
       "env names and flags beyond its built-in allow-list; NAME is built-in or custom:NAME",
       body=schemas.BackendAllowList, response=schemas.BackendAllowList)
async def set_allow_list(request: web.Request) -> web.Response:
    _require_backend_admin(request)
    body = await read_json(request, schemas.BackendAllowList)
    name = request.match_info["name"]
    custom = name.removeprefix(schemas.CUSTOM_BACKEND_PREFIX) if name.startswith(schemas.CUSTOM_BACKEND_PREFIX) else None
    async with server_of(request).db.session() as s:
        known = (name in BACKEND_TRAITS if custom is None
                 else await s.get(tables.Setting, SETTING_PREFIX + custom) is not None)
        if not known:
            raise not_found(f"backend {name!r} (custom backends are named custom:NAME)")
        await put_setting(s, ALLOW_PREFIX + name, body.model_dump_json())
        record_event(s, "backends", name, "AllowListChanged",
                     f"env: {', '.join(body.env) or '-'}; args: {', '.join(body.args) or '-'}", principal_of(request).name)
        await s.commit()
    return json_out(body)
