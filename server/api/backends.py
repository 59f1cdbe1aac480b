"""Backends: the built-in ones, and custom ones users register (`maas backend add -f FILE`).

A custom backend's definition is stored in the settings table under `backend/NAME` (JSON);
agents fetch the one an instance needs (`GET /v2/backends/NAME` with their worker token).
Registering one is admin-only: its command runs on every worker that serves it.
"""

from __future__ import annotations

import json

from aiohttp import web
from sqlalchemy import select

from server import schemas
from server.api.errors import conflict, forbidden, not_found, read_json
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.db.settings import put_setting
from server.events import record_event

SETTING_PREFIX = "backend/"

BUILTIN: list[schemas.BackendOut] = [
    schemas.BackendOut(
        name="llama.cpp", builtin=True, description="llama.cpp HTTP server (GGUF), CPU or GPU, in-process via xllamacpp",
        command=["python", "-m", "agent.backends.llamacpp_server", "--model", "{model_path}", "--alias", "{model_name}",
                 "--host", "{host}", "--port", "{port}"],
        metrics={"llamacpp:requests_processing": "requests_running", "llamacpp:requests_deferred": "requests_waiting",
                 "llamacpp:prompt_tokens_total": "prompt_tokens_total",
                 "llamacpp:tokens_predicted_total": "generation_tokens_total"}),
    schemas.BackendOut(
        name="vllm", builtin=True, description="vLLM OpenAI server (Hugging Face layouts), GPUs",
        command=["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model_path}",
                 "--served-model-name", "{model_name}", "--host", "{host}", "--port", "{port}"],
        image="vllm/vllm-openai:latest",
        metrics={"vllm:num_requests_running": "requests_running", "vllm:num_requests_waiting": "requests_waiting",
                 "vllm:prompt_tokens_total": "prompt_tokens_total",
                 "vllm:generation_tokens_total": "generation_tokens_total",
                 "vllm:gpu_cache_usage_perc": "kv_cache_usage_ratio"}),
    schemas.BackendOut(
        name="sglang", builtin=True, description="SGLang server (Hugging Face layouts), GPUs",
        command=["python", "-m", "sglang.launch_server", "--model-path", "{model_path}",
                 "--served-model-name", "{model_name}", "--host", "{host}", "--port", "{port}", "--enable-metrics"],
        image="lmsysorg/sglang:latest",
        metrics={"sglang:num_running_reqs": "requests_running", "sglang:num_queue_reqs": "requests_waiting",
                 "sglang:prompt_tokens_total": "prompt_tokens_total",
                 "sglang:generation_tokens_total": "generation_tokens_total", "sglang:token_usage": "kv_cache_usage_ratio"}),
    schemas.BackendOut(
        name="vox-box", builtin=True, description="VoxBox speech server (speech-to-text, text-to-speech), CPU or GPU",
        command=["vox-box", "start", "--model", "{model_path}", "--host", "{host}", "--port", "{port}"],
        image="gpustack/vox-box:latest", metrics_path=None),
    schemas.BackendOut(
        name="mindie", builtin=True, description="MindIE service daemon (Ascend NPUs); config written at launch",
        command=["/usr/local/Ascend/mindie/latest/mindie-service/bin/mindieservice_daemon"],
        image="ascendhub.huawei.com/public-ascendhub/mindie", health_path="/v1/models",
        metrics={"num_requests_running": "requests_running", "num_requests_waiting": "requests_waiting",
                 "prompt_tokens_total": "prompt_tokens_total", "generation_tokens_total": "generation_tokens_total",
                 "npu_cache_usage_perc": "kv_cache_usage_ratio"}),
]


def _out(row: tables.Setting) -> schemas.BackendOut:
    return schemas.BackendOut(**json.loads(row.value), created_at=row.created_at, updated_at=row.updated_at)


async def _custom_rows(session) -> list[tables.Setting]:
    query = select(tables.Setting).where(tables.Setting.key.startswith(SETTING_PREFIX, autoescape=True))
    return list((await session.execute(query.order_by(tables.Setting.key))).scalars())


def _check_admin(request: web.Request) -> None:
    if not principal_of(request).is_admin:
        raise forbidden("only an admin may register or remove backends: their commands run on the workers")


@route("GET", "/v2/backends", "List the built-in backends and the custom ones (deploy those as custom:NAME)",
       auth="user_or_worker", response=schemas.BackendOut, response_list=True)
async def list_backends(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        custom = [_out(row) for row in await _custom_rows(s)]
    return json_out(BUILTIN + custom)


@route("GET", "/v2/backends/{name}", "A custom backend's definition", auth="user_or_worker",
       response=schemas.BackendOut)
async def get_backend(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        row = await s.get(tables.Setting, SETTING_PREFIX + name)
        if row is None:
            raise not_found(f"custom backend {name!r}")
        return json_out(_out(row))


@route("POST", "/v2/backends", "Register a custom backend (admin)", body=schemas.BackendDefinition,
       response=schemas.BackendOut, status=201)
async def create_backend(request: web.Request) -> web.Response:
    _check_admin(request)
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


@route("DELETE", "/v2/backends/{name}", "Remove a custom backend (admin); running instances keep running")
async def delete_backend(request: web.Request) -> web.Response:
    _check_admin(request)
    name = request.match_info["name"]
    async with server_of(request).db.session() as s:
        row = await s.get(tables.Setting, SETTING_PREFIX + name)
        if row is None:
            raise not_found(f"custom backend {name!r}")
        await s.delete(row)
        record_event(s, "backends", name, "Removed", f"backend custom:{name}", principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": name})
