"""Model routes through the real gateway: weights (statistically, with a seeded draw), fallbacks (a
target without a running instance, one that answers 5xx before any byte), routes in /v1/models and
only for their team, usage under both route and target adding up exactly, the CLI; and the Responses
and Messages APIs passed through (a fixed-response backend, and real llama.cpp), with their usage."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest
from typer.testing import CliRunner

from conftest import eventually
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server import schemas
from server.app import MaasServer

pytestmark = pytest.mark.timeout(240)
PROMPT = [{"role": "user", "content": "hello there"}]
ROUTES_BACKEND = {
    "name": "routes-fixed",
    "description": "tests/routes_backend.py: fixed answers that say who served",
    "command": [sys.executable, str(Path(__file__).parent / "routes_backend.py"), "--host", "{host}",
                "--port", "{port}", "--model-name", "{model_name}"],
    "health_path": "/health",
    "metrics_path": None,
}
# tests/routes_backend.py's fixed counts
CHAT_PROMPT, CHAT_COMPLETION = 3, 2
RESPONSES_INPUT, RESPONSES_OUTPUT = 4, 3
MESSAGES_INPUT, MESSAGES_OUTPUT = 6, 2


async def _running(admin: MaasClient, names: list[str]) -> None:
    async def ready() -> bool:
        states = {i.model_name: i.state for i in await admin.list_instances()}
        return all(states.get(name) == "running" for name in names)
    await eventually(ready, timeout=60, message=f"{names} running")


async def _post(url: str, key: str, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers={
            "Authorization": f"Bearer {key}", **(headers or {})}) as response:
        return response.status, await response.read()


def _cli(*args: str, server: MaasServer, token: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args), env={"MAAS_SERVER": server.url, "MAAS_API_KEY": token,
                                                          "MAAS_CONTEXT": None})
    return result.exit_code, result.output


async def test_routes_weigh_fall_back_list_and_meter(server: MaasServer, admin: MaasClient, agent, tmp_path: Path,
                                                     tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MAAS_CONFIG", str(tmp_path / "maas-config.json"))
    await admin.add_backend(ROUTES_BACKEND)
    source = tmp_path / "fixed.bin"
    source.write_bytes(b"weights")
    fixed = {"source": str(source), "backend": "custom:routes-fixed", "cpu_only": True, "memory_bytes": 10**7}
    for name, replicas in (("old", 1), ("new", 1), ("broken", 1), ("idle", 0)):
        await admin.create_model({"name": name, "replicas": replicas, **fixed})
    await admin.create_model({"name": "vllm-later", "source": str(tiny_model), "backend": "vllm", "replicas": 0})
    await _running(admin, ["old", "new", "broken"])
    key = (await admin.create_key("routes", scopes=["inference"])).key

    # Created with the CLI; a name no model has, both ways.
    code, out = await asyncio.to_thread(_cli, "route", "create", "assistant", "--to", "old=80", "--to", "new=20",
                                        server=server, token=admin.token)
    assert code == 0, out
    assert "old=80% new=20%" in out
    code, out = await asyncio.to_thread(_cli, "route", "create", "old", "--to", "new=1", server=server,
                                        token=admin.token)
    assert code == 1 and "is a model" in out, out
    with pytest.raises(ApiClientError) as clash:
        await admin.create_model({"name": "assistant", "replicas": 0, **fixed})
    assert clash.value.status == 409 and "route" in clash.value.message
    with pytest.raises(ApiClientError) as missing:
        await admin.request("POST", "/v2/routes", json_body={"name": "nowhere", "targets": [
            {"model": "no-such-model", "weight": 1}]})
    assert missing.value.status == 400 and "no-such-model" in missing.value.message
    code, out = await asyncio.to_thread(_cli, "route", "create", "bad", "--to", "old=x", server=server,
                                        token=admin.token)
    assert code == 2 and "MODEL=WEIGHT" in out
    await admin.request("POST", "/v2/routes", json_body={
        "name": "safe", "targets": [{"model": "idle", "weight": 1}, {"model": "broken", "weight": 1}],
        "fallbacks": ["old"]})

    # Weights: 400 requests through the official client with a seeded draw; 20% expected on "new".
    server.routes.rng = random.Random(17)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    served: Counter[str] = Counter()
    for _ in range(400):
        reply = await client.chat.completions.create(model="assistant", messages=PROMPT, max_tokens=2)
        assert reply.model_extra["asked_for"] == reply.model_extra["served_by"]  # the target's own name went on
        served[reply.model_extra["served_by"]] += 1
    # Binomial(400, 0.2): mean 80, sd 8; 4 sd either way.
    assert set(served) == {"old", "new"} and 48 <= served["new"] <= 112, served
    stream = await client.chat.completions.create(model="assistant", messages=PROMPT, max_tokens=2, stream=True)
    chunks = [c async for c in stream]
    assert chunks and not any(c.usage for c in chunks)  # the client did not ask for usage: none relayed
    served[chunks[0].model_extra["served_by"]] += 1

    # Fallbacks: "idle" has no instance and "broken" answers 500 before any byte: "old" serves them all.
    for stream_it in (False, True) * 5:
        if stream_it:
            parts = [c async for c in await client.chat.completions.create(
                model="safe", messages=PROMPT, max_tokens=2, stream=True, stream_options={"include_usage": True})]
            assert parts[0].model_extra["served_by"] == "old" and parts[-1].usage.completion_tokens == CHAT_COMPLETION
        else:
            reply = await client.chat.completions.create(model="safe", messages=PROMPT, max_tokens=2)
            assert reply.model_extra["served_by"] == "old"
    # Without a fallback a route whose models all fail is a 502; one with nothing running a 503.
    await admin.update_route("safe", schemas.RouteUpdate(fallbacks=[]))
    await eventually(lambda: _fallbacks_gone(server), message="the route change reached the gateway")
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model="safe", messages=PROMPT, max_tokens=2)
    assert failed.value.status_code == 502 and "broken" in failed.value.message
    await admin.request("POST", "/v2/routes", json_body={"name": "asleep", "targets": [{"model": "idle", "weight": 1}]})
    await eventually(lambda: _has_alias(server, "asleep"), message="the new route reached the gateway")
    with pytest.raises(openai.APIStatusError) as asleep:
        await client.chat.completions.create(model="asleep", messages=PROMPT, max_tokens=2)
    assert asleep.value.status_code == 503 and "no running instance" in asleep.value.message

    # /v1/models: the routes with a serving model (not "asleep"), with their targets.
    listed = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert listed["assistant"]["route"] == {"targets": ["old", "new"], "fallbacks": []}
    assert listed["assistant"]["categories"] == ["llm"] and "safe" in listed and "asleep" not in listed

    # Another team's member sees no route of the default team and cannot call one.
    await admin.create_team("blue")
    await admin.create_user("bob", "password-123", teams=["blue"])
    async with MaasClient(server.url) as anonymous:
        bob_token = (await anonymous.login("bob", "password-123")).token
    async with MaasClient(server.url, bob_token) as bob:
        bob_key = (await bob.create_key("bob", scopes=["inference"])).key
        assert await bob.list_routes() == []
        with pytest.raises(ApiClientError) as hidden:
            await bob.get_route("assistant")
        assert hidden.value.status == 404
    bob_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=bob_key, max_retries=0)
    assert not [m for m in (await bob_client.models.list()).data if m.id in ("assistant", "safe")]
    with pytest.raises(openai.NotFoundError):
        await bob_client.chat.completions.create(model="assistant", messages=PROMPT, max_tokens=2)
    await bob_client.close()

    # Responses and Messages APIs through the route (plain and streamed), with their usage.
    status, data = await _post(f"{server.url}/v1/responses", key, {"model": "assistant", "input": "hi"})
    assert status == 200 and json.loads(data)["usage"]["output_tokens"] == RESPONSES_OUTPUT
    served[json.loads(data)["served_by"]] += 1
    status, data = await _post(f"{server.url}/v1/responses", key, {"model": "old", "input": "hi", "stream": True})
    assert status == 200 and b"response.completed" in data
    status, data = await _post(f"{server.url}/v1/messages", key, {"model": "old", "max_tokens": 4, "messages": PROMPT},
                               headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and json.loads(data)["content"][0]["text"] == "hi there"
    async with aiohttp.ClientSession() as http, http.post(  # Anthropic's clients send x-api-key
            f"{server.url}/v1/messages", json={"model": "old", "max_tokens": 4, "messages": PROMPT, "stream": True},
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as response:
        assert response.status == 200
        text = await response.text()
    assert text.count("event: ") == 6 and "message_delta" in text
    status, data = await _post(f"{server.url}/v1/messages", key, {"model": "vllm-later", "max_tokens": 4,
                                                                 "messages": PROMPT})
    error = json.loads(data)["error"]
    assert status == 400 and error["code"] == "model_not_supported" and "its backend" in error["message"]

    # Usage: by route and by model, each adds up exactly to what was sent and served.
    await client.close()
    rows = (await admin.request("GET", "/v2/usage", params={"by": "route,model", "since": "24h"}))["items"]
    by = {(r["route"], r["model"]): r for r in rows}
    assert by[("assistant", "old")]["requests"] == served["old"]
    assert by[("assistant", "new")]["requests"] == served["new"]
    assert by[("assistant", "old")]["requests"] + by[("assistant", "new")]["requests"] == 402
    assert by[("safe", "old")]["requests"] == 10  # all the fallbacks, none counted twice
    assert by[("safe", "broken")]["requests"] == 1 and by[("safe", "broken")]["prompt_tokens"] == 0  # the 502
    assert ("safe", "idle") not in by
    chat_tokens = sum(r["prompt_tokens"] for k, r in by.items() if k[0] == "assistant")
    assert chat_tokens == 401 * CHAT_PROMPT + RESPONSES_INPUT
    direct = by[("", "old")]  # called by its own name: one Responses stream, two Messages
    assert (direct["requests"], direct["prompt_tokens"], direct["completion_tokens"]) == (
        3, RESPONSES_INPUT + 2 * MESSAGES_INPUT, RESPONSES_OUTPUT + 2 * MESSAGES_OUTPUT)
    by_route = {r["route"]: r["requests"] for r in
                (await admin.request("GET", "/v2/usage", params={"by": "route"}))["items"]}
    by_model = {r["model"]: r["requests"] for r in
                (await admin.request("GET", "/v2/usage", params={"by": "model"}))["items"]}
    assert sum(by_route.values()) == sum(by_model.values())
    code, out = await asyncio.to_thread(_cli, "usage", "--by", "route,model", "--since", "7d", server=server,
                                        token=admin.token)
    assert code == 0 and "ROUTE" in out and "assistant" in out, out

    # Canary: shift all the weight to the new model, then delete the old route.
    code, out = await asyncio.to_thread(_cli, "route", "update", "assistant", "--to", "new=1", server=server,
                                        token=admin.token)
    assert code == 0 and "new=100%" in out, out
    await eventually(lambda: _only_target(server, "assistant", "new"), message="the shift reached the gateway")
    reply = await openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).chat.completions.create(
        model="assistant", messages=PROMPT, max_tokens=2)
    assert reply.model_extra["served_by"] == "new"
    code, out = await asyncio.to_thread(_cli, "route", "delete", "asleep", server=server, token=admin.token)
    assert code == 0
    assert [r.name for r in await admin.list_routes()] == ["assistant", "safe"]

    # The TUI's :usage at 80x24 against this server: the busiest model first, its routes under the table.
    from maas_tui.tui.app import MaasApp
    from maas_tui.tui.widgets import ResourceTable

    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("colon", *"usage", "enter")
        table = lambda: app.screen.query(ResourceTable)  # noqa: E731
        await eventually(lambda: _pause_then(pilot, lambda: type(app.screen).__name__ == "UsageScreen"
                                             and bool(table()) and len(table().first()._keys) == 3),
                         message="the usage view's rows")
        assert list(table().first()._keys) == ["old", "new", "broken"]
        detail = str(app.screen.query_one("#row-detail").render())
        assert f"old: {served['old'] + 10 + 3} req" in detail and "via assistant, safe" in detail, detail


async def _pause_then(pilot, check) -> bool:
    await pilot.pause(0.05)
    return check()


async def _fallbacks_gone(server: MaasServer) -> bool:
    return server.routes.aliases["safe"].fallbacks == ()


async def _has_alias(server: MaasServer, name: str) -> bool:
    return name in server.routes.aliases


async def _only_target(server: MaasServer, name: str, model: str) -> bool:
    return server.routes.aliases[name].models == (model,)


async def test_llamacpp_serves_responses_and_messages(server: MaasServer, admin: MaasClient, api_key: str, agent,
                                                      tiny_model: Path):
    """Real llama.cpp answers the Responses and Messages APIs; the gateway relays them and meters their usage."""
    await admin.create_model({"name": "llama", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
    await _running(admin, ["llama"])
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    reply = await client.responses.create(model="llama", input="hello", max_output_tokens=3)
    assert reply.usage.output_tokens > 0
    prompt, completion = reply.usage.input_tokens, reply.usage.output_tokens
    events = [e async for e in await client.responses.create(model="llama", input="hello", max_output_tokens=3,
                                                             stream=True)]
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage.output_tokens > 0
    prompt += completed[0].response.usage.input_tokens
    completion += completed[0].response.usage.output_tokens
    await client.close()
    status, data = await _post(f"{server.url}/v1/messages", api_key, {"model": "llama", "max_tokens": 3,
                                                                     "messages": PROMPT})
    assert status == 200, data
    message = json.loads(data)
    assert message["type"] == "message"
    prompt += message["usage"]["input_tokens"]
    completion += message["usage"]["output_tokens"]
    status, data = await _post(f"{server.url}/v1/messages", api_key, {"model": "llama", "max_tokens": 3,
                                                                     "messages": PROMPT, "stream": True})
    assert status == 200 and b"message_stop" in data
    streamed: dict[str, int] = {}
    for line in data.split(b"\n"):
        if line.startswith(b"data:"):
            event = json.loads(line[5:])
            streamed.update((event.get("message") or {}).get("usage") or {})
            streamed.update(event.get("usage") or {})
    prompt += streamed["input_tokens"]
    completion += streamed["output_tokens"]
    [row] = (await admin.request("GET", "/v2/usage", params={"by": "model"}))["items"]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (4, prompt, completion)


@pytest.mark.parametrize("body", [
    b'{"model":"assistant","messages":[{"role":"user","content":"hi"}],"max_tokens":4}',  # spliced
    b'{"model" :\n "assistant", "stream": true,"stream_options":{"include_usage":true}}',  # spliced
    b'{"model":"assistant","metadata":{"model":"keep-me"}}',  # another "model": re-encoded
    b'{"\\u006dodel":"assistant","metadata":{"model":"keep-me"}}',  # an escaped key: re-encoded
    b'{"model":"assistant","messages":[{"role":"model","content":"caf\\u00e9"}]}',  # an escape: re-encoded
])
def test_a_route_sends_the_target_name_and_the_rest_unchanged(body: bytes):
    from server.gateway.proxy import _with_model

    payload = json.loads(body)
    sent = _with_model(body, payload, "old-model")
    assert json.loads(sent) == {**payload, "model": "old-model"}
    if body.count(b'"model"') == 1 and b"\\u" not in body:
        assert sent == body.replace(b'"assistant"', b'"old-model"')  # byte for byte but the name


def test_the_usage_view_names_who_is_close_to_a_limit():
    from maas_tui.render.usage import near_limits, near_text
    from server.schemas.limits import LimitsListed, LimitUsage

    rows = [LimitsListed(id=1, scope="key", subject="app", budget_day=1000, rpm=100,
                         usage=LimitUsage(tokens_today=850, requests=10)),
            LimitsListed(id=2, scope="model", subject="llama", max_concurrency=4, usage=LimitUsage(in_flight=4)),
            LimitsListed(id=3, scope="team", subject="red", tpm=0, usage=LimitUsage(tokens=5))]  # 0: no limit
    assert [words for _, words in near_limits(rows)] == [
        "model llama: 100% of max_concurrency (4 of 4 requests in flight)",
        "key app: 85% of budget_day (850 of 1.0k tokens today)"]
    assert near_text(rows).plain.endswith("+1 more (maas limits list)") and not near_text(rows[2:]).plain
