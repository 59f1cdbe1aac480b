"""Benchmark results per model generation (`maas bench` stores what it measured through the gateway; the
rollout gate stores its own), and the model's rollout bench gate (server/controllers/bench_gate.py)."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from server.api.errors import bad_request, not_found, read_json
from server.api.resources import get_model
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.schemas.bench import BenchGateOut, BenchGateSet, BenchHistory, BenchResultCreate, BenchResultOut

HISTORY = 200  # results listed, newest first


def result_out(row: tables.BenchResult) -> BenchResultOut:
    return BenchResultOut(id=row.id, model=row.model_name, generation=row.generation, source=row.source,
                          instance=row.instance, created_by=row.created_by, created_at=row.created_at,
                          prompt_tokens=row.prompt_tokens, max_tokens=row.max_tokens, levels=row.levels)


def gate_out(model: tables.Model) -> BenchGateOut | None:
    if not model.bench_gate:
        return None
    return BenchGateOut(expression=model.bench_gate["expression"], requests=model.bench_gate.get("requests", 4),
                        max_tokens=model.bench_gate.get("max_tokens", 16),
                        decided_generation=model.bench_gate_generation)


@route("GET", "/v2/models/{name}/bench", "A model's benchmark results (newest first) and its rollout bench gate",
       response=BenchHistory)
async def bench_history(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"])
        rows = (await s.execute(select(tables.BenchResult).where(tables.BenchResult.model_id == model.id)
                                .order_by(tables.BenchResult.id.desc()).limit(HISTORY))).scalars().all()
        return json_out(BenchHistory(model=model.name, generation=model.generation, gate=gate_out(model),
                                     results=[result_out(r) for r in rows]))


@route("POST", "/v2/models/{name}/bench", "Store a benchmark of the model's current (or a given) generation",
       body=BenchResultCreate, response=BenchResultOut, status=201)
async def store_bench(request: web.Request) -> web.Response:
    body = await read_json(request, BenchResultCreate)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"], write=True)
        generation = body.generation or model.generation
        if generation > model.generation:
            raise bad_request(f"model {model.name!r} has no generation {generation} (newest: {model.generation})")
        row = tables.BenchResult(model_id=model.id, model_name=model.name, generation=generation, source="cli",
                                 created_by=principal.name, prompt_tokens=body.prompt_tokens,
                                 max_tokens=body.max_tokens, levels=[x.model_dump(mode="json") for x in body.levels])
        s.add(row)
        await s.flush()
        await s.commit()
        return json_out(result_out(row), status=201)


@route("PUT", "/v2/models/{name}/bench/gate", "Gate the model's next rollouts on a benchmark: the rollout holds "
       "after the new generation's first replica, which is measured against the previous one; worse pauses it",
       body=BenchGateSet, response=BenchGateOut)
async def set_gate(request: web.Request) -> web.Response:
    body = await read_json(request, BenchGateSet)
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"], write=True)
        model.bench_gate = body.model_dump(mode="json")
        # The generation running now needs no verdict: the gate judges the rollouts that come after.
        model.bench_gate_generation = max(model.bench_gate_generation, model.generation)
        record_event(s, "models", model, "BenchGateSet", body.expression, principal_of(request).name)
        await s.commit()
        return json_out(gate_out(model))


@route("DELETE", "/v2/models/{name}/bench/gate", "Remove the model's rollout bench gate (a held rollout goes on)")
async def delete_gate(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"], write=True)
        if not model.bench_gate:
            raise not_found(f"a bench gate on model {model.name!r}")
        model.bench_gate = None
        record_event(s, "models", model, "BenchGateRemoved", "", principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": "bench gate"})
