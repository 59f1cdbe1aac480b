"""One deploy-to-running path on every store (SQLite, the embedded PostgreSQL, MariaDB; see
conftest.py): deploy, serve through the gateway, scale, usage, delete, with the watch stream
telling each step."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from conftest import eventually
from maas_tui.client import MaasClient
from server.app import MaasServer

pytestmark = pytest.mark.timeout(180)


async def test_deploy_serve_scale_delete(server: MaasServer, admin: MaasClient, api_key: str, agent,
                                         tiny_model: Path):
    watch = admin.watch(["instances"])
    assert (await anext(watch)).type == "snapshot"
    await admin.create_model({"name": "Tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 2})
    # A second model whose name differs only in case is another model (binary collation on MariaDB).
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0})

    states: set[str] = set()

    async def both_running() -> bool:
        instances = await admin.list_instances("Tiny")
        return len(instances) == 2 and all(i.state == "running" for i in instances)

    async def follow() -> None:
        async for event in watch:
            if event.type == "event" and event.object:
                states.add(event.object["state"])
            if "running" in states:
                return
    async with asyncio.timeout(60):  # the watch tells of a running instance
        await follow()
    await watch.aclose()
    await eventually(both_running, timeout=60, message="2 running replicas")

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    try:
        reply = await client.chat.completions.create(model="Tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert [m.id for m in (await client.models.list()).data] == ["Tiny"]  # the one serving
    finally:
        await client.close()

    assert sorted(m.name for m in await admin.list_models()) == ["Tiny", "tiny"]
    await admin.update_model("Tiny", {"replicas": 1})

    async def one_left() -> bool:
        return len(await admin.list_instances("Tiny")) == 1
    await eventually(one_left, timeout=60, message="the scale-down")

    async def usage_written() -> bool:  # the gateway's usage upsert, on this store
        rows = await admin.usage()
        return any(r.model == "Tiny" and r.requests >= 1 for r in rows)
    await eventually(usage_written, timeout=30, message="usage rows")

    await admin.delete_model("Tiny")

    async def gone() -> bool:
        return not await admin.list_instances("Tiny") and [m.name for m in await admin.list_models()] == ["tiny"]
    await eventually(gone, timeout=60, message="the model and its instances to go")
