"""The gateway under real traffic: balancing, failover, usage metering, key scopes and allowed models."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from conftest import eventually, free_port
from maas_tui.client import MaasClient
from server.app import MaasServer

pytestmark = pytest.mark.timeout(180)
PROMPT = [{"role": "user", "content": "hello there"}]


async def _deploy(admin: MaasClient, name: str, tiny_model: Path, replicas: int) -> list:
    await admin.create_model({"name": name, "source": str(tiny_model), "backend": "llama.cpp", "replicas": replicas})

    async def running() -> bool:
        instances = await admin.list_instances(name)
        return len(instances) == replicas and all(i.state == "running" for i in instances)

    await eventually(running, message=f"{replicas} running replicas of {name}")
    return await admin.list_instances(name)


async def _predicted_tokens(server: MaasServer, instance) -> float:
    """Tokens this llama.cpp instance generated, from its own /metrics (with its key, as the gateway's)."""
    key = {"Authorization": f"Bearer {server.backend_keys.key(instance.id)}"}
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{instance.port}/metrics", headers=key) as response:
        text = await response.text()
    match = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


async def test_balancing_spreads_requests(server: MaasServer, admin: MaasClient, api_key: str, agent, tiny_model: Path):
    instances = await _deploy(admin, "spread", tiny_model, 2)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    for _ in range(20):
        reply = await client.chat.completions.create(model="spread", messages=PROMPT, max_tokens=3)
        assert reply.usage.completion_tokens == 3
    await client.close()
    per_instance = [await _predicted_tokens(server, i) for i in instances]
    # One at a time, so nothing is outstanding: ties rotate, each instance gets half.
    assert per_instance == [30.0, 30.0], per_instance


async def test_backends_answer_only_the_gateway(server: MaasServer, admin: MaasClient, api_key: str, agent,
                                                tiny_model: Path):
    """A llama.cpp instance requires its key (which only the gateway presents): reaching it on the worker's
    address passes no API key, team rule or meter. The key is in no read of the instance."""
    [instance] = await _deploy(admin, "keyed", tiny_model, 1)
    key = server.backend_keys.key(instance.id)
    direct = f"http://127.0.0.1:{instance.port}"
    body = {"model": "keyed", "messages": PROMPT, "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": f"Bearer {api_key}"}, {"Authorization": "Bearer maasb_guess"}):
            async with http.post(f"{direct}/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status == 401, await response.text()
            async with http.get(f"{direct}/metrics", headers=headers) as response:
                assert response.status == 401
        async with http.get(f"{direct}/health") as response:
            assert response.status == 200  # what the agent and the gateway's probes ask
        async with http.post(f"{direct}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    assert (await client.chat.completions.create(model="keyed", messages=PROMPT, max_tokens=2)).usage
    chunks = [c async for c in await client.chat.completions.create(model="keyed", messages=PROMPT, max_tokens=2,
                                                                     stream=True)]
    assert chunks
    await client.close()
    shown = (await admin.get_instance(instance.name)).model_dump_json() + str(await admin.list_events(limit=1000))
    assert key not in shown


async def test_failover_on_a_killed_instance_loses_no_request(server: MaasServer, admin: MaasClient, api_key: str,
                                                              agent, tiny_model: Path):
    instances = await _deploy(admin, "sturdy", tiny_model, 2)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    await client.chat.completions.create(model="sturdy", messages=PROMPT, max_tokens=2)  # warm the pool
    os.kill(instances[0].pid, signal.SIGKILL)
    # Requests keep flowing while the agent notices the death and the table drops the instance.
    replies = await asyncio.gather(*(client.chat.completions.create(model="sturdy", messages=PROMPT, max_tokens=2)
                                     for _ in range(16)))
    streamed = await client.chat.completions.create(model="sturdy", messages=PROMPT, max_tokens=2, stream=True)
    assert [c async for c in streamed]
    await client.close()
    assert all(r.choices[0].message.content is not None for r in replies)

    async def dead_one_reported() -> bool:
        states = {i.id: i.state for i in await admin.list_instances("sturdy")}
        return states.get(instances[0].id) == "error"

    await eventually(dead_one_reported, message="the killed instance to be reported as error")
    assert len(server.routes.models["sturdy"].targets) == 1


async def test_usage_is_exact_for_plain_and_streamed(server: MaasServer, admin: MaasClient, api_key: str, agent,
                                                     tiny_model: Path):
    await _deploy(admin, "metered", tiny_model, 1)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    prompt_tokens = completion_tokens = 0
    for _ in range(3):
        reply = await client.chat.completions.create(model="metered", messages=PROMPT, max_tokens=4)
        prompt_tokens += reply.usage.prompt_tokens
        completion_tokens += reply.usage.completion_tokens
    for _ in range(2):  # the client asks for usage: it gets the usage chunk
        stream = await client.chat.completions.create(model="metered", messages=PROMPT, max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage]
        assert len(usage) == 1
        prompt_tokens += usage[0].prompt_tokens
        completion_tokens += usage[0].completion_tokens
    per_request_prompt = reply.usage.prompt_tokens
    for _ in range(2):  # the client does not ask: the gateway still meters, and the client sees no usage chunk
        stream = await client.chat.completions.create(model="metered", messages=PROMPT, max_tokens=6, stream=True)
        chunks = [c async for c in stream]
        assert not any(c.usage for c in chunks) and all(c.choices for c in chunks)
        prompt_tokens += per_request_prompt
        completion_tokens += 6  # the tiny model never stops early: it always hits max_tokens
    await client.close()

    rows = (await admin.request("GET", "/v2/usage", params={"by": "key,model"}))["items"]
    assert rows == [{"day": None, "hour": None, "api_key": "tests", "model": "metered", "route": None, "team": None,
                     "user": None, "requests": 7, "prompt_tokens": prompt_tokens,
                     "completion_tokens": completion_tokens}]
    by_model = (await admin.request("GET", "/v2/usage", params={"by": "model"}))["items"]
    assert [(r["model"], r["requests"]) for r in by_model] == [("metered", 7)]


async def test_key_scopes_and_allowed_models(server: MaasServer, admin: MaasClient, agent, tiny_model: Path):
    await _deploy(admin, "open", tiny_model, 1)
    await admin.create_model({"name": "closed", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0})
    inference_only = (await admin.request("POST", "/v2/keys", json_body={
        "name": "app", "scopes": ["inference"], "allowed_models": ["open"]}))["key"]
    management_only = (await admin.request("POST", "/v2/keys", json_body={
        "name": "ops", "scopes": ["management"]}))["key"]

    async with aiohttp.ClientSession() as http:
        async def status(method: str, path: str, key: str, body: dict | None = None, header: str = "Authorization") -> int:
            value = f"Bearer {key}" if header == "Authorization" else key
            async with http.request(method, server.url + path, json=body, headers={header: value}) as response:
                await response.read()
                return response.status

        chat = {"model": "open", "messages": PROMPT, "max_tokens": 2}
        assert await status("GET", "/v2/models", inference_only) == 403
        assert await status("POST", "/v1/chat/completions", inference_only, chat) == 200
        assert await status("POST", "/v1/chat/completions", inference_only, chat, header="x-api-key") == 200
        assert await status("POST", "/v1/chat/completions", inference_only, {**chat, "model": "closed"}) == 403
        async with http.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {inference_only}"}) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["open"]
        assert await status("GET", "/v2/models", management_only) == 200
        assert await status("POST", "/v1/chat/completions", management_only, chat) == 403

    from maas_tui.client import ApiClientError
    with pytest.raises(ApiClientError) as refused:
        await admin.request("POST", "/v2/keys", json_body={"name": "x", "scopes": ["root"]})
    assert refused.value.status == 422 and "scopes" in refused.value.message


SPEECH_BACKEND = {
    "name": "speech",
    "description": "tests/speech_backend.py: answers with what it received",
    "command": [sys.executable, str(Path(__file__).parent / "speech_backend.py"), "--host", "{host}",
                "--port", "{port}", "--model-name", "{model_name}"],
    "health_path": "/health",
    "metrics_path": None,
}


async def test_endpoints_follow_model_categories_and_audio_passes_through(
        server: MaasServer, admin: MaasClient, api_key: str, agent, tiny_model: Path, tmp_path: Path):
    await admin.add_backend(SPEECH_BACKEND)
    source = tmp_path / "speech-model.bin"
    source.write_bytes(b"weights")
    await admin.create_model({"name": "ears", "source": str(source), "backend": "custom:speech", "replicas": 1,
                              "cpu_only": True, "memory_bytes": 10**7,
                              "categories": ["speech_to_text", "text_to_speech"]})
    await admin.create_model({"name": "chatty", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0})

    async def running() -> bool:
        instances = await admin.list_instances("ears")
        return bool(instances) and instances[0].state == "running"
    await eventually(running, message="the speech backend running")

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    audio = bytes(range(256)) * 4096 + b"\r\n--not-a-boundary\r\n"  # 1 MiB of binary with CRLFs in it
    heard = await client.audio.transcriptions.create(model="ears", file=("clip.wav", audio, "audio/wav"),
                                                     language="en", temperature=0.5)
    extra = heard.model_extra
    assert heard.text == f"{len(audio)} bytes heard"
    assert extra["file"] == {"filename": "clip.wav", "content_type": "audio/wav", "bytes": len(audio),
                             "sha256": hashlib.sha256(audio).hexdigest()}
    assert extra["fields"] == {"model": "ears", "language": "en", "temperature": "0.5"}
    spoken = await client.audio.speech.create(model="ears", input="hello", voice="alloy")
    assert spoken.content == b"RIFF\x00\x00\x00\x00WAVEhello" + bytes(range(256))

    models = {m.id: m.model_extra["categories"] for m in (await client.models.list()).data}
    assert models == {"ears": ["speech_to_text", "text_to_speech"]}  # chatty runs nothing: not listed

    with pytest.raises(openai.BadRequestError) as wrong:  # the speech model does not chat
        await client.chat.completions.create(model="ears", messages=PROMPT, max_tokens=2)
    assert wrong.value.code == "model_not_supported" and "category llm" in wrong.value.message
    with pytest.raises(openai.BadRequestError) as wrong:  # the llm does not transcribe (checked before it runs)
        await client.audio.transcriptions.create(model="chatty", file=("a.wav", b"x", "audio/wav"))
    assert "does not serve /v1/audio/transcriptions" in wrong.value.message
    for path, body in (("/v1/rerank", {"query": "q", "documents": ["a"]}), ("/v1/images/generations", {"prompt": "p"}),
                       ("/v1/embeddings", {"input": "x"})):
        async with aiohttp.ClientSession() as http, http.post(
                server.url + path, json={"model": "chatty", **body},
                headers={"Authorization": f"Bearer {api_key}"}) as response:
            error = (await response.json())["error"]
            assert (response.status, error["type"], error["code"]) == (400, "invalid_request_error",
                                                                       "model_not_supported"), error
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model-xyz", messages=PROMPT)
    await client.close()

    # Latency and answers by model and status in /metrics; an unknown name is no label value.
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
        text = await response.text()

    def count(model: str, status: int) -> float:
        match = re.search(rf'^maas_gateway_request_duration_seconds_count\{{model="{model}",status="{status}"\}} (\S+)$',
                          text, re.M)
        answered = re.search(rf'^maas_gateway_http_requests_total\{{model="{model}",status="{status}"\}} (\S+)$',
                             text, re.M)
        assert match and answered and match.group(1) == answered.group(1), text
        return float(match.group(1))

    assert (count("ears", 200), count("ears", 400), count("chatty", 400), count("", 404)) == (2, 1, 4, 1)
    assert "no-such-model-xyz" not in text
    inf = re.search(r'^maas_gateway_request_duration_seconds_bucket\{le="\+Inf",model="ears",status="200"\} (\S+)$',
                    text, re.M)
    assert inf and float(inf.group(1)) == 2, text

    from maas_tui.client import ApiClientError
    with pytest.raises(ApiClientError) as refused:
        await admin.create_model({"name": "bad", "source": str(source), "backend": "custom:speech",
                                  "categories": ["audio"]})
    assert refused.value.status == 422 and "categories" in refused.value.message


# --- the lean upstream client, against raw HTTP servers on 127.0.0.1 ------------------------

async def _raw_server(replies: list[bytes]) -> tuple[asyncio.AbstractServer, int, list[bytes], list[int]]:
    """Answers the n-th request (across connections) with replies[n] (b"" closes at once);
    records each request and counts connections."""
    requests: list[bytes] = []
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                requests.append(head + await reader.readexactly(length))
                reply = replies[len(requests) - 1]
                if not reply:
                    break
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply or b"Content-Length" not in reply.split(b"\r\n\r\n")[0] \
                        and b"chunked" not in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], requests, connections


async def test_upstream_client_keeps_alive_and_reads_every_framing():
    from server.gateway.upstream import UpstreamPool

    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": 1234}"
    chunked = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n")
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    until_close = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here"
    server, port, requests, connections = await _raw_server([ok, ok, chunked, closing, ok, until_close])
    pool = UpstreamPool()
    try:
        first = await pool.request("127.0.0.1", port, "/v1/x", b'{"model": "m"}', "application/json")
        assert (first.status, first.body, first.headers["content-type"]) == (200, b'{"a": 1234}', "application/json")
        assert requests[0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:") and requests[0].endswith(
            b'Content-Length: 14\r\nContent-Type: application/json\r\n\r\n{"model": "m"}')
        assert (await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")).body == b'{"a": 1234}'
        second = await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
        assert (second.status, second.body) == (201, b"hello, world")
        assert connections[0] == 1  # three requests, one keep-alive connection
        assert (await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")).body == b"ok"
        assert pool.idle_count() == 0  # Connection: close is not pooled
        assert (await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")).body == b'{"a": 1234}'
        assert (await pool.request("127.0.0.1", port, "/v1/x", b"{}", "text/plain")).body == b"no length here"
        assert connections[0] == 2 and pool.idle_count() == 0  # a new one after the close; HTTP/1.0 not pooled
    finally:
        pool.close()
        server.close()


async def test_upstream_client_failures_say_whether_the_backend_answered():
    from server.gateway.upstream import UpstreamError, UpstreamPool

    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly part"
    server, port, _, _ = await _raw_server([b"", cut, b"garbage\r\n\r\n"])
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamError) as dropped:  # closed before any byte: safe to retry elsewhere
            await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
        assert not dropped.value.answered
        with pytest.raises(UpstreamError) as truncated:
            await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
        assert truncated.value.answered and "cut short" in str(truncated.value)
        with pytest.raises(UpstreamError, match="malformed status line"):
            await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
    finally:
        server.close()
    with pytest.raises(UpstreamError, match="cannot connect") as refused:
        await pool.request("127.0.0.1", free_port(), "/v1/x", b"{}", "application/json")
    assert not refused.value.answered


async def test_upstream_stream_decodes_chunks_split_anywhere():
    """The streamed body comes out the same however the bytes are cut into packets."""
    from server.gateway.upstream import UpstreamError, UpstreamStream

    events = [b'data: {"n": %d}\n\n' % i for i in range(5)]
    wire = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\nX-Trailer: 1\r\n\r\n")
    loop = asyncio.get_running_loop()
    for size in (1, 2, 7, len(wire)):
        exchange = UpstreamStream(loop)
        for i in range(0, len(wire), size):
            exchange.data_received(wire[i:i + size])
        assert exchange.head.result()[0] == 200
        assert b"".join([chunk async for chunk in exchange.body()]) == b"".join(events)

    cut = UpstreamStream(loop)  # the backend dies mid-stream: the reader hears of it
    cut.data_received(wire[:150])
    cut.connection_lost(None)
    with pytest.raises(UpstreamError, match="cut short"):
        [chunk async for chunk in cut.body()]


@pytest.mark.parametrize("answer, usage", [
    (b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}', {"prompt_tokens": 5, "completion_tokens": 4}),
    (b'{"usage" :\n {"input_tokens":2,"output_tokens":3},"content":[]}', {"input_tokens": 2, "output_tokens": 3}),
    # The word in the text and a key spelled with an escape are not the key: the whole answer says.
    (b'{"choices":[{"text":"the \\"usage\\": {}"}],"usage":{"prompt_tokens":1}}', {"prompt_tokens": 1}),
    (b'{"a\\"usage":{"prompt_tokens":9},"usage":{"prompt_tokens":1}}', {"prompt_tokens": 1}),
    (b'{"a\\"usage":{"prompt_tokens":9}}', None),
    (b'{"usage":null}', None),
    (b'{"usage":{"prompt_tokens":1', None),  # truncated
    (b'{"choices":[]}', None),
])
def test_the_usage_of_a_whole_answer(answer: bytes, usage: dict | None):
    from server.gateway.proxy import _usage_of

    assert _usage_of(answer) == usage
