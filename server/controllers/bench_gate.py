"""The rollout bench gate, run by the leader: when a gated model's new generation has its first replica
running (the rollout holds there: controllers/rollout.py `hold_new`), bench that instance and a running
instance of the previous generation the same way, store both results, and judge the gate's expression
(server/schemas/bench.py). Passed (or nothing to compare with): the rollout goes on. Worse: the rollout is
paused with the reason in its message and a BenchGateFailed event; `maas model rollout resume` goes on
anyway, `maas model rollout undo` goes back.

Both instances are measured directly (their address, with the key the gateway presents to backends), one
after the other, at concurrency 1: the gateway would spread the requests over both generations. When no
instance of the previous generation runs any more, the newest stored result of an older generation is the
baseline.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import aiohttp
from sqlalchemy import select

from server import schemas
from server.db import tables
from server.events import record_event
from server.ndjson import json_lines
from server.reconcile import ReconcileLoop
from server.schemas import bench

log = logging.getLogger(__name__)

S = schemas.InstanceState
GATE_PROMPT_TOKENS = 16
ACTOR = "bench-gate"


class BenchGate(ReconcileLoop):
    name = "bench-gate"
    kinds = ("models", "instances")

    async def reconcile(self) -> None:
        async with self.server.db.session() as s:
            models = (await s.execute(select(tables.Model).where(
                tables.Model.bench_gate.is_not(None), tables.Model.state == schemas.ModelState.active))).scalars().all()
            waiting = [m for m in models if m.bench_gate and m.bench_gate_generation < m.generation]
            todo = []
            for model in waiting:
                instances = (await s.execute(select(tables.ModelInstance).where(
                    tables.ModelInstance.model_id == model.id, tables.ModelInstance.state == S.running))).scalars().all()
                new = next((i for i in sorted(instances, key=lambda i: i.id) if i.generation == model.generation), None)
                if new is None:
                    continue
                old = next((i for i in sorted(instances, key=lambda i: -i.generation) if i.generation < model.generation),
                           None)
                todo.append((model.id, model.name, model.generation, dict(model.bench_gate), _target(new),
                             _target(old) if old else None))
        for job in todo:
            await self._judge(*job)

    async def _judge(self, model_id: int, model_name: str, generation: int, gate_spec: dict[str, Any],
                     new: tuple, old: tuple | None) -> None:
        gate = bench.parse_gate(gate_spec["expression"])
        requests, max_tokens = int(gate_spec.get("requests", 4)), int(gate_spec.get("max_tokens", 16))
        previous_level = None
        results = []
        if old is not None:
            previous_level = await self._bench(model_name, old, requests, max_tokens)
            results.append((old, previous_level))
        new_level = await self._bench(model_name, new, requests, max_tokens)
        results.append((new, new_level))
        async with self.server.db.session() as s:
            model = await s.get(tables.Model, model_id)
            if model is None or model.generation != generation or not model.bench_gate:
                return  # changed meanwhile: the next pass judges what is there now
            for (instance_id, instance_name, instance_generation, _url), level in results:
                s.add(tables.BenchResult(model_id=model_id, model_name=model_name, generation=instance_generation,
                                         source="gate", instance=instance_name, created_by=ACTOR,
                                         prompt_tokens=GATE_PROMPT_TOKENS, max_tokens=max_tokens,
                                         levels=[level.model_dump(mode="json")]))
            if previous_level is None:
                previous_level = await _stored_baseline(s, model_id, generation)
            passed, why = gate.judge(new_level, previous_level)
            log.info("bench gate of %s generation %d: %s (%s)", model_name, generation, why,
                     "failed" if passed is False else "passed")
            model.bench_gate_generation = generation
            if passed is False:
                model.paused = True
                model.rollout_message = (f"paused by the bench gate '{gate_spec['expression']}': {why}; "
                                         f"'maas model rollout resume {model_name}' goes on, "
                                         f"'maas model rollout undo {model_name}' goes back")
                record_event(s, "models", model, "BenchGateFailed", f"generation {generation}: {why}", ACTOR)
            else:
                record_event(s, "models", model, "BenchGatePassed", f"generation {generation}: {why}", ACTOR)
            await s.commit()

    async def _bench(self, model_name: str, target: tuple, requests: int, max_tokens: int) -> bench.BenchLevel:
        instance_id, _name, _generation, url = target
        headers = {"Authorization": f"Bearer {self.server.backend_keys.key(instance_id)}"}
        # A connection per request: llama.cpp drops keep-alive connections after a stream (FIELD-NOTES).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=120, sock_connect=5)) as http:
            async def send(body: dict[str, Any]) -> AsyncIterator[str]:
                async with http.post(url, json=body, headers=headers) as response:
                    if response.status >= 400:
                        raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
                    async for line in json_lines(response.content.iter_any()):
                        text = line.decode(errors="replace").strip()
                        if text.startswith("data:"):
                            yield text[5:].strip()

            return await bench.run_level(send, model_name, bench.GATE_CONCURRENCY, requests, GATE_PROMPT_TOKENS,
                                         max_tokens)


def _target(instance: tables.ModelInstance) -> tuple[int, str, int, str]:
    return (instance.id, instance.name, instance.generation,
            f"http://{instance.address}:{instance.port}/v1/chat/completions")


async def _stored_baseline(s, model_id: int, generation: int) -> bench.BenchLevel | None:
    """The newest stored concurrency-1 measurement of an older generation."""
    rows = (await s.execute(select(tables.BenchResult).where(
        tables.BenchResult.model_id == model_id, tables.BenchResult.generation < generation)
        .order_by(tables.BenchResult.id.desc()).limit(20))).scalars()
    for row in rows:
        level = bench.level_of([bench.BenchLevel.model_validate(x) for x in row.levels])
        if level is not None:
            return level
    return None
