"""The real server on SQLite over HTTP on 127.0.0.1: health, OpenAPI, auth, validation and errors,
API keys, credential kinds, the watch stream, and scaling/deletion without an agent."""

from __future__ import annotations

import asyncio
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from sqlalchemy.exc import SAWarning

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server import schemas

WATCH_TIMEOUT = 10.0


# --- helpers -------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def model_body(source: Path | str, name: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": str(source), "backend": "llama.cpp", **extra}


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Assert a /v2 JSON error with this status; return its `error` object."""
    text = await response.text()
    assert response.status == status, f"expected {status}, got {response.status}: {text}"
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"].strip(), body
    return error


async def openai_error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Assert an error in OpenAI's shape: {"error": {"message", "type", "code"}}."""
    text = await response.text()
    assert response.status == status, f"expected {status}, got {response.status}: {text}"
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    assert isinstance(error["type"], str) and error["type"], body
    return error


async def written_state(http: aiohttp.ClientSession, url: str, token: str) -> tuple[Any, int]:
    """What a failed request must not change: the model list and the number of events."""
    async with http.get(f"{url}/v2/models", headers=bearer(token)) as r:
        assert r.status == 200
        models = await r.json()
    async with http.get(f"{url}/v2/events", params={"limit": "1000"}, headers=bearer(token)) as r:
        assert r.status == 200
        events = len((await r.json())["items"])
    return models, events


async def read_message(response: aiohttp.ClientResponse, skip_heartbeats: bool = True) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(response.content.readline(), WATCH_TIMEOUT)
        assert line, "the watch stream ended"
        message = json.loads(line)
        schemas.WatchMessage.model_validate(message)  # every line follows the wire contract
        if skip_heartbeats and message["type"] == "heartbeat":
            continue
        return message


async def register_fake_worker(http: aiohttp.ClientSession, server, name: str = "fake-1",
                               token: str | None = None) -> dict[str, Any]:
    """Register a worker; `token` is its current one when it registers again under its name."""
    body = {"name": name, "address": "127.0.0.1", "agent_port": 9} | ({"token": token} if token else {})
    async with http.post(f"{server.url}/v2/agent/register", json=body, headers=bearer(server.cluster_token)) as r:
        assert r.status == 201, await r.text()
        return await r.json()


# --- health and OpenAPI --------------------------------------------------------------


async def test_server_binds_loopback_only(server):
    assert server.config.host == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


async def test_healthz_needs_no_auth(server, http):
    async with http.get(f"{server.url}/healthz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"


async def test_openapi_document(server, http):
    async with http.get(f"{server.url}/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    assert "/v2/models" in doc["paths"] and "/v2/watch" in doc["paths"]
    assert {"get", "post"} <= set(doc["paths"]["/v2/models"])
    schemas_ = doc["components"]["schemas"]
    assert {"ModelCreate", "InstanceOut", "ErrorResponse"} <= set(schemas_)
    assert "replicas" in schemas_["ModelCreate"]["properties"]


# --- login ---------------------------------------------------------------------------


async def test_login_wrong_password(server, http):
    async with http.post(f"{server.url}/v2/auth/login", json={"username": "admin", "password": "wrong"}) as r:
        error = await error_of(r, 401)
    assert error["code"] == "unauthorized"
    async with http.post(f"{server.url}/v2/auth/login", json={"username": "nobody", "password": "x"}) as r:
        await error_of(r, 401)


async def test_login_token_works(server, http):
    password = server.admin_password_file.read_text().strip()
    async with http.post(f"{server.url}/v2/auth/login", json={"username": "admin", "password": password}) as r:
        assert r.status == 200, await r.text()
        login = schemas.LoginResponse.model_validate(await r.json())
    assert login.username == "admin" and login.token.startswith("maas_")
    async with http.get(f"{server.url}/v2/models", headers=bearer(login.token)) as r:
        assert r.status == 200
        assert (await r.json()) == {"items": []}


# --- bad input: right 4xx, JSON error, nothing written ------------------------------


@dataclass
class Bad:
    method: str
    path: str
    status: int
    json_body: Callable[[Path], Any] | None = None
    raw_body: bytes | None = None
    auth: str = "admin"  # admin | none | wrong
    contains: Callable[[Path], list[str]] = field(default=lambda _m: [])
    headers: dict[str, str] = field(default_factory=dict)


BAD_INPUTS = {
    "missing-model-file": Bad("POST", "/v2/models", 400, json_body=lambda m: model_body(m.parent / "nope.gguf"),
                              contains=lambda m: [str(m.parent / "nope.gguf")]),
    "relative-source": Bad("POST", "/v2/models", 400, json_body=lambda m: model_body("models/tiny.gguf"),
                           contains=lambda _m: ["models/tiny.gguf"]),
    "unknown-backend": Bad("POST", "/v2/models", 422, json_body=lambda m: model_body(m) | {"backend": "tgi"},
                           contains=lambda _m: ["llama.cpp"]),
    "negative-replicas": Bad("POST", "/v2/models", 422, json_body=lambda m: model_body(m, replicas=-1),
                             contains=lambda _m: ["replicas"]),
    "duplicate-name": Bad("POST", "/v2/models", 409, json_body=lambda m: model_body(m, name="existing", replicas=0),
                          contains=lambda _m: ["existing"]),
    "malformed-json": Bad("POST", "/v2/models", 400, raw_body=b'{"name": "x", ',
                          headers={"Content-Type": "application/json"}),
    "json-array": Bad("POST", "/v2/models", 400, raw_body=b'[{"name": "x"}]',
                      headers={"Content-Type": "application/json"}),
    "json-string": Bad("POST", "/v2/models", 400, raw_body=b'"tiny"', headers={"Content-Type": "application/json"}),
    "empty-body": Bad("POST", "/v2/models", 400, raw_body=b"", headers={"Content-Type": "application/json"}),
    "not-utf8": Bad("POST", "/v2/models", 400, raw_body=b'{"name": "\xff\xfe"}',
                    headers={"Content-Type": "application/json"}),
    "name-with-slash": Bad("POST", "/v2/models", 422, json_body=lambda m: model_body(m, name="org/model"),
                           contains=lambda _m: ["name"]),
    "name-with-spaces": Bad("POST", "/v2/models", 422, json_body=lambda m: model_body(m, name="my model"),
                            contains=lambda _m: ["name"]),
    "extra-field": Bad("POST", "/v2/models", 422, json_body=lambda m: model_body(m, gpus=2),
                       contains=lambda _m: ["gpus"]),
    "missing-field": Bad("POST", "/v2/models", 422, json_body=lambda m: {"name": "x", "backend": "llama.cpp"},
                         contains=lambda _m: ["source"]),
    "wrong-api-key": Bad("POST", "/v2/models", 401, json_body=lambda m: model_body(m, name="sneaky"), auth="wrong"),
    "missing-api-key": Bad("POST", "/v2/models", 401, json_body=lambda m: model_body(m, name="sneaky"), auth="none"),
    "list-wrong-api-key": Bad("GET", "/v2/models", 401, auth="wrong"),
    "list-missing-api-key": Bad("GET", "/v2/models", 401, auth="none"),
    "patch-negative-replicas": Bad("PATCH", "/v2/models/existing", 422, json_body=lambda _m: {"replicas": -5},
                                   contains=lambda _m: ["replicas"]),
    "patch-unknown-model": Bad("PATCH", "/v2/models/ghost", 404, json_body=lambda _m: {"replicas": 1}),
    "patch-relative-source": Bad("PATCH", "/v2/models/existing", 400, json_body=lambda _m: {"source": "rel.gguf"}),
    "get-unknown-model": Bad("GET", "/v2/models/ghost", 404, contains=lambda _m: ["ghost"]),
    "delete-unknown-model": Bad("DELETE", "/v2/models/ghost", 404, contains=lambda _m: ["ghost"]),
    "events-limit-text": Bad("GET", "/v2/events?limit=abc", 400, contains=lambda _m: ["limit"]),
    "events-limit-zero": Bad("GET", "/v2/events?limit=0", 400),
    "events-limit-negative": Bad("GET", "/v2/events?limit=-3", 400),
    "watch-bogus-kind": Bad("GET", "/v2/watch?kinds=bogus", 400, contains=lambda _m: ["bogus"]),
    "watch-api-keys-kind": Bad("GET", "/v2/watch?kinds=api_keys", 400),
    "watch-bad-since": Bad("GET", "/v2/watch?kinds=models&since=yesterday", 400),
    "unknown-instance": Bad("GET", "/v2/instances/12345", 404),
    "unknown-worker": Bad("GET", "/v2/workers/ghost", 404),
    "delete-unknown-key": Bad("DELETE", "/v2/keys/ghost", 404),
    "key-bad-name": Bad("POST", "/v2/keys", 422, json_body=lambda _m: {"name": "has space"}),
    "login-empty-body": Bad("POST", "/v2/auth/login", 400, raw_body=b"", auth="none"),
    "login-missing-password": Bad("POST", "/v2/auth/login", 422, json_body=lambda _m: {"username": "admin"},
                                  auth="none"),
    "unknown-route": Bad("GET", "/v2/nothing-here", 404),
    "wrong-method": Bad("PUT", "/v2/models", 405),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_input_is_a_4xx_json_error_and_writes_nothing(case: Bad, server, admin: MaasClient, http,
                                                                tiny_model: Path):
    await admin.create_model(model_body(tiny_model, name="existing", replicas=0))
    before = await written_state(http, server.url, admin.token)

    headers = dict(case.headers)
    if case.auth == "admin":
        headers |= bearer(admin.token)
    elif case.auth == "wrong":
        headers |= bearer("maas_000000000000_not-a-real-secret")
    kwargs: dict[str, Any] = {"headers": headers}
    if case.json_body is not None:
        kwargs["json"] = case.json_body(tiny_model)
    elif case.raw_body is not None:
        kwargs["data"] = case.raw_body
    async with http.request(case.method, server.url + case.path, **kwargs) as r:
        assert r.status < 500
        error = await error_of(r, case.status)
    for text in case.contains(tiny_model):
        assert text in error["message"], error

    assert await written_state(http, server.url, admin.token) == before


async def test_validation_errors_carry_field_details(server, admin: MaasClient, http, tiny_model: Path):
    async with http.post(f"{server.url}/v2/models", json=model_body(tiny_model, replicas=-1, context_length=1),
                         headers=bearer(admin.token)) as r:
        error = await error_of(r, 422)
    fields = {d["field"] for d in error["details"]}
    assert {"replicas", "context_length"} <= fields


async def test_api_key_header_alternative(server, http, api_key: str):
    async with http.get(f"{server.url}/v2/models", headers={"x-api-key": api_key}) as r:
        assert r.status == 200
    async with http.get(f"{server.url}/v2/models", headers={"Authorization": "Basic abc"}) as r:
        await error_of(r, 401)


async def test_a_new_keys_first_burst_costs_one_lookup(server, api_key: str):
    """Fifty requests that bring a key not cached yet share one database lookup, and get the same answer."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    engine = server.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        server.auth.invalidate()
        principals = await asyncio.gather(*(server.auth.authenticate(api_key) for _ in range(50)))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len({id(p) for p in principals}) == 1 and principals[0].name == "admin"
    assert sum("api_keys" in s for s in statements) == 1, statements
    assert await server.auth.authenticate(api_key) is principals[0]  # cached now: no more statements
    assert sum("api_keys" in s for s in statements) == 1


async def test_client_raises_api_errors(admin: MaasClient):
    with pytest.raises(ApiClientError) as info:
        await admin.get_model("ghost")
    assert info.value.status == 404 and info.value.code == "not_found" and "ghost" in info.value.message


# --- 5xx found by probing: each is a bug (see the report) ----------------------------


async def _status_and_body(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


async def test_deeply_nested_json_is_a_400(server, admin: MaasClient, http):
    before = await written_state(http, server.url, admin.token)
    async with http.post(f"{server.url}/v2/models", data=b"[" * 100_000, headers=bearer(admin.token)) as r:
        await error_of(r, 400)
    assert await written_state(http, server.url, admin.token) == before


async def test_gateway_deeply_nested_json_is_a_400(server, http, api_key: str):
    async with http.post(f"{server.url}/v1/chat/completions", data=b"[" * 100_000, headers=bearer(api_key)) as r:
        await openai_error_of(r, 400)


async def test_overlong_source_path_is_a_400(server, admin: MaasClient, http):
    before = await written_state(http, server.url, admin.token)
    source = "/" + "a" * 300 + ".gguf"
    async with http.post(f"{server.url}/v2/models", json=model_body(source), headers=bearer(admin.token)) as r:
        await error_of(r, 400)
    assert await written_state(http, server.url, admin.token) == before


@pytest.mark.parametrize("limit", ["²", "1" * 5000], ids=["superscript", "5000-digits"])
async def test_events_limit_that_isdigit_but_not_int_is_a_400(server, admin: MaasClient, http, limit: str):
    async with http.get(f"{server.url}/v2/events", params={"limit": limit}, headers=bearer(admin.token)) as r:
        await error_of(r, 400)


@pytest.mark.parametrize("ref", ["²", "99999999999999999999"], ids=["superscript", "huge"])
async def test_instance_ref_that_is_not_an_id_is_a_404(server, admin: MaasClient, http, ref: str):
    async with http.get(f"{server.url}/v2/instances/{ref}", headers=bearer(admin.token)) as r:
        await error_of(r, 404)


@pytest.mark.parametrize("worker_id", ["²", "99999999999999999999"], ids=["superscript", "huge"])
async def test_forged_worker_token_is_a_401(server, http, worker_id: str):
    async with http.get(f"{server.url}/v2/models", headers=bearer(f"maasw_{worker_id}_secret")) as r:
        await error_of(r, 401)


async def test_watch_since_that_isdigit_but_not_int_is_a_400(server, admin: MaasClient, http):
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models", "since": "²"},
                        headers=bearer(admin.token)) as r:
        await error_of(r, 400)


# --- the gateway's errors ------------------------------------------------------------


async def test_gateway_models_needs_a_key(server, http, api_key: str):
    async with http.get(f"{server.url}/v1/models") as r:
        error = await openai_error_of(r, 401)
    assert error["type"] == "authentication_error"
    async with http.get(f"{server.url}/v1/models", headers=bearer("maas_000000000000_nope")) as r:
        await openai_error_of(r, 401)
    async with http.get(f"{server.url}/v1/models", headers=bearer(api_key)) as r:
        assert r.status == 200
        assert await r.json() == {"object": "list", "data": []}


async def test_gateway_unknown_model_is_404(server, http, api_key: str):
    body = {"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(api_key)) as r:
        error = await openai_error_of(r, 404)
    assert "ghost" in error["message"]


async def test_gateway_model_without_running_instance_is_503(server, admin: MaasClient, http, api_key: str,
                                                              tiny_model: Path):
    await admin.create_model(model_body(tiny_model, name="idle", replicas=0))
    body = {"model": "idle", "messages": [{"role": "user", "content": "hi"}]}

    async def unavailable() -> bool:
        async with http.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(api_key)) as r:
            if r.status == 404:  # the routing table has not seen the model yet
                return False
            await openai_error_of(r, 503)
            return True

    await eventually(unavailable, timeout=10, message="a 503 for a model with no running instance")
    async with http.get(f"{server.url}/v1/models", headers=bearer(api_key)) as r:
        assert (await r.json())["data"] == []


@pytest.mark.parametrize("raw", [b'{"model": "x", ', b"", b"\xff"], ids=["truncated", "empty", "not-utf8"])
async def test_gateway_malformed_json_is_400(server, http, api_key: str, raw: bytes):
    async with http.post(f"{server.url}/v1/chat/completions", data=raw,
                         headers=bearer(api_key) | {"Content-Type": "application/json"}) as r:
        error = await openai_error_of(r, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [{"messages": []}, {"model": ""}, {"model": 3}, ["model"]],
                         ids=["no-model", "empty-model", "number-model", "array"])
async def test_gateway_body_without_model_is_400(server, http, api_key: str, body: Any):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        async with http.post(f"{server.url}{path}", json=body, headers=bearer(api_key)) as r:
            error = await openai_error_of(r, 400)
        assert "model" in error["message"]


# --- API keys ------------------------------------------------------------------------


async def test_api_key_lifecycle(server, admin: MaasClient, http):
    created = await admin.create_key("ci")
    assert created.key.startswith("maas_") and created.name == "ci"
    assert created.prefix in created.key

    async with http.get(f"{server.url}/v2/keys", headers=bearer(admin.token)) as r:
        listed = (await r.json())["items"]
    assert [k["name"] for k in listed] == ["ci"]
    assert "key" not in listed[0] and "secret_hash" not in listed[0]
    assert created.key not in json.dumps(listed)

    async with http.post(f"{server.url}/v2/keys", json={"name": "ci"}, headers=bearer(admin.token)) as r:
        await error_of(r, 409)

    async with http.get(f"{server.url}/v1/models", headers=bearer(created.key)) as r:
        assert r.status == 200
    async with http.get(f"{server.url}/v2/models", headers=bearer(created.key)) as r:
        await error_of(r, 403)  # a new key is for an application: inference unless asked for more

    await admin.delete_key("ci")
    # Rejected at once, not after the credential cache expires.
    async with http.get(f"{server.url}/v1/models", headers=bearer(created.key)) as r:
        await openai_error_of(r, 401)
    async with http.get(f"{server.url}/v2/models", headers=bearer(created.key)) as r:
        await error_of(r, 401)
    assert await admin.list_keys() == []

    with pytest.raises(ApiClientError) as info:
        await admin.delete_key("ci")
    assert info.value.status == 404


async def test_session_tokens_are_not_listed_as_keys(admin: MaasClient):
    assert await admin.list_keys() == []


async def test_key_secret_is_never_readable_again(server, admin: MaasClient, http):
    created = await admin.create_key("once")
    async with http.get(f"{server.url}/v2/events", params={"limit": "1000"}, headers=bearer(admin.token)) as r:
        assert created.key not in await r.text()


# --- credentials by kind -------------------------------------------------------------


async def test_cluster_token_is_only_for_registration(server, http):
    assert server.cluster_token and server.cluster_token.startswith("maasc_")
    async with http.get(f"{server.url}/v2/models", headers=bearer(server.cluster_token)) as r:
        error = await error_of(r, 403)
    assert error["code"] == "forbidden"
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "instances"},
                        headers=bearer(server.cluster_token)) as r:
        await error_of(r, 403)
    async with http.get(f"{server.url}/v1/models", headers=bearer(server.cluster_token)) as r:
        await openai_error_of(r, 403)


async def test_registration_needs_the_cluster_token(server, admin: MaasClient, http):
    body = {"name": "fake-1", "address": "127.0.0.1", "agent_port": 9}
    async with http.post(f"{server.url}/v2/agent/register", json=body) as r:
        await error_of(r, 401)
    async with http.post(f"{server.url}/v2/agent/register", json=body, headers=bearer(admin.token)) as r:
        await error_of(r, 403)
    async with http.post(f"{server.url}/v2/agent/register", json=body,
                         headers=bearer("maasc_not-the-cluster-token")) as r:
        await error_of(r, 401)
    assert await admin.list_workers() == []


async def test_worker_token_scope(fast_heartbeat, server, admin: MaasClient, http):
    registered = schemas.WorkerRegistered.model_validate(await register_fake_worker(http, server))
    token = registered.token
    assert token.startswith(f"maasw_{registered.worker.id}_")
    assert [w.name for w in await admin.list_workers()] == ["fake-1"]

    async with http.get(f"{server.url}/v2/models", headers=bearer(token)) as r:
        await error_of(r, 403)
    async with http.post(f"{server.url}/v2/keys", json={"name": "x"}, headers=bearer(token)) as r:
        await error_of(r, 403)
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models"}, headers=bearer(token)) as r:
        await error_of(r, 403)
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "instances,models"}, headers=bearer(token)) as r:
        await error_of(r, 403)
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "instances"}, headers=bearer(token)) as r:
        assert r.status == 200
        first = await read_message(r)
    assert first["type"] == "snapshot" and first["items"] == {"instances": []}

    async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(token)) as r:
        assert r.status == 200, await r.text()
    async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(admin.token)) as r:
        await error_of(r, 403)


async def test_reregistration_revokes_the_old_worker_token(server, http):
    old = (await register_fake_worker(http, server))["token"]
    async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(old)) as r:
        assert r.status == 200
    new = (await register_fake_worker(http, server, token=old))["token"]
    assert new != old
    async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(old)) as r:
        await error_of(r, 401)
    async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(new)) as r:
        assert r.status == 200


# --- watch ---------------------------------------------------------------------------


@pytest.fixture
def fast_heartbeat(server):
    """Heartbeats every 0.2 s: a stream whose client left ends at the next write, so the server stops fast."""
    server.config.watch_heartbeat = 0.2
    return server


async def test_watch_heartbeats(fast_heartbeat, admin: MaasClient, http):
    server = fast_heartbeat
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models,workers"},
                        headers=bearer(admin.token)) as r:
        snapshot = await read_message(r)
        assert snapshot["type"] == "snapshot" and set(snapshot["items"]) == {"models", "workers"}
        beat = await read_message(r, skip_heartbeats=False)
    assert beat["type"] == "heartbeat" and beat["version"] >= snapshot["version"]


async def test_watch_snapshot_then_events_then_resume(fast_heartbeat, server, admin: MaasClient, http,
                                                     tiny_model: Path):
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models"}, headers=bearer(admin.token)) as r:
        assert r.status == 200
        assert r.content_type == "application/x-ndjson"
        snapshot = await read_message(r)
        assert snapshot["type"] == "snapshot"
        assert snapshot["items"] == {"models": []}
        version = snapshot["version"]

        await admin.create_model(model_body(tiny_model, name="watched", replicas=0))
        event = await read_message(r)
    assert event["type"] == "event"
    assert (event["kind"], event["action"], event["object"]["name"]) == ("models", "created", "watched")
    assert event["version"] > version
    schemas.ModelOut.model_validate(event["object"])

    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models", "since": str(version)},
                        headers=bearer(admin.token)) as r:
        assert r.status == 200
        replayed = await read_message(r)
    assert replayed["type"] == "event"
    assert replayed["version"] == event["version"]
    assert (replayed["kind"], replayed["action"], replayed["object"]["name"]) == ("models", "created", "watched")

    # A version the server does not hold yields a fresh snapshot, now with the model.
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models", "since": str(10**15)},
                        headers=bearer(admin.token)) as r:
        fresh = await read_message(r)
    assert fresh["type"] == "snapshot"
    assert [m["name"] for m in fresh["items"]["models"]] == ["watched"]


async def test_watch_filters_kinds(fast_heartbeat, server, admin: MaasClient, http, tiny_model: Path):
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "events"}, headers=bearer(admin.token)) as r:
        snapshot = await read_message(r)
        assert set(snapshot["items"]) == {"events"}
        await admin.create_model(model_body(tiny_model, name="filtered", replicas=0))
        event = await read_message(r)
    assert event["kind"] == "events"
    assert event["object"]["object_name"] == "filtered" and event["object"]["reason"] == "Created"


async def test_watch_through_the_client(fast_heartbeat, admin: MaasClient, tiny_model: Path):
    stream = admin.watch(["models"])
    try:
        first = await asyncio.wait_for(anext(stream), WATCH_TIMEOUT)
        assert first.type == "snapshot" and first.items == {"models": []}
        await admin.create_model(model_body(tiny_model, name="via-client", replicas=0))
        while True:
            message = await asyncio.wait_for(anext(stream), WATCH_TIMEOUT)
            if message.type == "event":
                break
        assert message.kind == "models" and message.action == "created" and message.object["name"] == "via-client"
    finally:
        await stream.aclose()


# --- scaling and deletion without an agent -------------------------------------------


async def test_scale_and_delete_without_workers(server, admin: MaasClient, http, tiny_model: Path):
    async with http.post(f"{server.url}/v2/models", json=model_body(tiny_model, name="lonely", replicas=2),
                         headers=bearer(admin.token)) as r:
        assert r.status == 201, await r.text()
        created = schemas.ModelOut.model_validate(await r.json())
    assert created.replicas == 2 and created.generation == 1 and created.state == "active"
    assert created.ready_replicas == 0

    async def two_unschedulable() -> bool:
        instances = await admin.list_instances("lonely")
        return (len(instances) == 2
                and all(i.state == "pending" for i in instances)
                and all([r.reason for r in i.schedule_reasons] == ["no_workers"] for i in instances))

    await eventually(two_unschedulable, timeout=15, message="two pending instances with reason no_workers")
    for instance in await admin.list_instances("lonely"):
        assert instance.worker_name is None and instance.claim is None
        assert "no worker" in instance.state_message
        assert instance.model_name == "lonely" and instance.generation == 1
    reasons = {e.reason for e in await admin.list_events(name="lonely")}
    assert "Created" in reasons

    scaled = await admin.update_model("lonely", {"replicas": 0})
    assert scaled.replicas == 0 and scaled.generation == 1  # scaling is not a new generation

    async def no_instances() -> bool:
        return await admin.list_instances("lonely") == []

    await eventually(no_instances, timeout=15, message="instances removed after scaling to 0")

    async with http.delete(f"{server.url}/v2/models/lonely", headers=bearer(admin.token)) as r:
        assert r.status == 202, await r.text()
        assert (await r.json())["state"] == "deleting"

    async def gone() -> bool:
        async with http.get(f"{server.url}/v2/models/lonely", headers=bearer(admin.token)) as r:
            return r.status == 404

    await eventually(gone, timeout=15, message="the model to be deleted")
    assert await admin.list_models() == []
    reasons = [e.reason for e in await admin.list_events(name="lonely")]
    assert "Deleting" in reasons and "Deleted" in reasons


async def test_delete_with_pending_instances(server, admin: MaasClient, tiny_model: Path):
    await admin.create_model(model_body(tiny_model, name="doomed", replicas=3))

    async def three() -> bool:
        return len(await admin.list_instances("doomed")) == 3

    await eventually(three, timeout=15, message="three instances")
    deleting = await admin.delete_model("doomed")
    assert deleting.state == "deleting"
    with pytest.raises(ApiClientError) as info:
        await admin.update_model("doomed", {"replicas": 1})
    assert info.value.status in (404, 409)

    async def all_gone() -> bool:
        return await admin.list_models() == [] and await admin.list_instances() == []

    await eventually(all_gone, timeout=15, message="model and instances removed")


async def test_teardown_deletes_instances_before_their_model(admin: MaasClient, tiny_model: Path):
    await admin.create_model(model_body(tiny_model, name="ordered", replicas=2))

    async def two() -> bool:
        return len(await admin.list_instances("ordered")) == 2

    await eventually(two, timeout=15, message="two instances")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SAWarning)
        await admin.delete_model("ordered")

        async def gone() -> bool:
            return await admin.list_models() == []

        await eventually(gone, timeout=15, message="the model to be deleted")
    assert [str(w.message) for w in caught if issubclass(w.category, SAWarning)] == []


async def test_spec_change_is_a_new_generation(admin: MaasClient, tiny_model: Path):
    await admin.create_model(model_body(tiny_model, name="gen", replicas=0))
    updated = await admin.update_model("gen", {"context_length": 4096})
    assert updated.generation == 2 and updated.spec.context_length == 4096
    same = await admin.update_model("gen", {"context_length": 4096})
    assert same.generation == 2
    assert (await admin.get_model("gen")).generation == 2


async def test_model_watch_events_carry_the_ready_count(server, admin: MaasClient, agent, tiny_model, http):
    """REST, the snapshot and the watch's events agree on ready_replicas (events once said 0 always)."""
    async with http.get(f"{server.url}/v2/watch", params={"kinds": "models"}, headers=bearer(admin.token)) as r:
        await r.content.readline()  # the snapshot
        await admin.create_model({"name": "counted", "source": str(tiny_model), "backend": "llama.cpp",
                                  "replicas": 1})
        seen = []
        while not seen or seen[-1] != 1:
            line = json.loads(await asyncio.wait_for(r.content.readline(), 60))
            if line.get("type") == "event" and line["object"]["name"] == "counted":
                seen.append(line["object"]["ready_replicas"])
    assert seen[0] == 0 and seen[-1] == 1
    assert (await admin.get_model("counted")).ready_replicas == 1
