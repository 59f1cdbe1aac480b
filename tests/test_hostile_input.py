"""Hostile input at the server's edge (server/api/inputs.py, server/api/http_server.py): every refusal is a
4xx JSON error, never a 5xx, and nothing is written.

Text that would reach the database (NUL, invalid UTF-8, lone surrogates) is refused on every store; JSON is
bounded (integer digits, nesting, NaN, repeated keys); bodies are limited per route class from the
Content-Length before a byte is read; an oversized header is a JSON 431 that leaves no part of itself in the
log; an undeclared method is a 405 with Allow; request bodies are typed strictly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from yarl import URL

from maas_tui.client import MaasClient
from server.api import inputs

STORES = [pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("postgres", marks=pytest.mark.postgres),
          pytest.param("mariadb", marks=pytest.mark.mariadb)]
every_store = pytest.mark.parametrize("store", STORES, indirect=True)


@pytest.fixture
def model(tiny_model: Path) -> dict[str, Any]:
    """A model that can be created (its source is a real GGUF file under a model root)."""
    return MODEL | {"source": str(tiny_model)}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def json_error(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The `error` object of a JSON error with this status (/v2 or OpenAI's shape)."""
    text = await response.text()
    assert response.status == status, f"expected {status}, got {response.status}: {text}"
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    return body["error"]


async def written(http: aiohttp.ClientSession, url: str, token: str) -> tuple[Any, ...]:
    """What a refused request must not change: models, users, keys and the number of events."""
    seen = []
    for path in ("/v2/models", "/v2/users", "/v2/keys", "/v2/events?limit=1000"):
        async with http.get(url + path, headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
            items = (await r.json())["items"]
            seen.append(len(items) if "events" in path else items)
    return tuple(seen)


async def raw_exchange(port: int, request: bytes, read_timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library fixing them up); the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), read_timeout)
        return status, headers, body
    finally:
        writer.close()


# --- text: NUL, invalid UTF-8 and lone surrogates, on every store --------------------------------------------

MODEL = {"name": "m", "source": "/models/m.gguf", "backend": "llama.cpp", "replicas": 0}
# (what, method, path (already %-encoded), JSON body text or None, anonymous, the field the error names)
BAD_TEXT = [
    ("nul-in-path", "GET", "/v2/models/a%00b", None, False, "'name'"),
    ("nul-in-delete-path", "DELETE", "/v2/keys/k%00", None, False, "'name'"),
    ("nul-in-user-path", "GET", "/v2/users/ad%00min/keys", None, False, "'name'"),
    ("nul-in-instance-ref", "GET", "/v2/instances/%00", None, False, "'ref'"),
    ("nul-in-query", "GET", "/v2/instances?model=m%00", None, False, "'model'"),
    ("nul-in-query-name", "GET", "/v2/events?na%00me=x", None, False, "query parameter name"),
    ("nul-in-event-filter", "GET", "/v2/events?name=%00&kind=models", None, False, "'name'"),
    ("utf8-in-path", "GET", "/v2/models/a%FFb", None, False, "path segment"),
    ("utf8-in-query", "GET", "/v2/events?name=%C3%28", None, False, "'name'"),
    ("surrogate-in-query", "GET", "/v2/instances?worker=%ED%A0%80", None, False, "'worker'"),
    ("nul-in-login", "POST", "/v2/auth/login", '{"username": "ad\\u0000min", "password": "x"}', True, "username"),
    ("surrogate-in-login", "POST", "/v2/auth/login", '{"username": "\\ud800", "password": "x"}', True, "username"),
    ("nul-in-model-name", "POST", "/v2/models", json.dumps(MODEL | {"name": "m\x00"}), False, "name"),
    ("nul-in-env-value", "POST", "/v2/models", json.dumps(MODEL | {"env": {"K": "v\x00"}}), False, "env.K"),
    ("nul-in-env-key", "POST", "/v2/models", json.dumps(MODEL | {"env": {"K\x00": "v"}}), False, "a key in env"),
    ("nul-in-args", "POST", "/v2/models", json.dumps(MODEL | {"args": ["--a", "b\x00"]}), False, "args[1]"),
    ("surrogate-in-source", "POST", "/v2/models", json.dumps(MODEL).replace("/models/m.gguf", "/\\udc80.gguf"),
     False, "source"),
    ("nul-in-patch", "PATCH", "/v2/models/m", '{"backend_version": "1\\u0000"}', False, "backend_version"),
    ("nul-in-key-models", "POST", "/v2/keys", '{"name": "k", "allowed_models": ["a\\u0000"]}', False,
     "allowed_models[0]"),
    ("nul-in-new-user", "POST", "/v2/users", '{"username": "u\\u0000", "password": "long-enough-1"}', False,
     "username"),
    ("nul-in-backend", "POST", "/v2/backends", '{"name": "b", "command": ["x\\u0000"]}', False, "command[0]"),
]


@every_store
async def test_text_that_cannot_be_stored_is_a_400_naming_the_field(server, admin: MaasClient, http, model):
    async with http.post(f"{server.url}/v2/models", json=model, headers=bearer(admin.token)) as r:
        assert r.status == 201, await r.text()
    before = await written(http, server.url, admin.token)
    for what, method, path, body, anonymous, field in BAD_TEXT:
        headers = {} if anonymous else bearer(admin.token)
        data = None if body is None else body.encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with http.request(method, URL(server.url + path, encoded=True), data=data, headers=headers) as r:
            error = await json_error(r, 400)
        assert error["code"] == "invalid_text", (what, error)
        assert field in error["message"], (what, error)
        assert "\x00" not in json.dumps(error), (what, error)
    # Raw bytes that are not UTF-8 at all.
    async with http.post(f"{server.url}/v2/auth/login", data=b'{"username": "\xff", "password": "x"}') as r:
        assert (await json_error(r, 400))["code"] == "invalid_text"
    assert await written(http, server.url, admin.token) == before
    async with http.get(f"{server.url}/healthz") as r:
        assert (await r.json())["database"] == "ok"


# --- JSON bounds -------------------------------------------------------------------------------------------------

HUGE = "1" * 5000  # Python refuses int() of more than 4300 digits: this was a 500 everywhere


async def test_a_5000_digit_integer_is_a_400_on_login_v2_and_v1(server, admin: MaasClient, api_key: str, http):
    before = await written(http, server.url, admin.token)
    cases = [
        ("/v2/auth/login", f'{{"username": "admin", "password": {HUGE}}}', {}),
        ("/v2/auth/login", f'{{"username": "admin", "password": "x", "n": -{HUGE}}}', {}),
        ("/v2/models", json.dumps(MODEL)[:-1] + f', "context_length": {HUGE}}}', bearer(admin.token)),
        ("/v2/keys", f'{{"name": "k", "expires_in_days": {HUGE}}}', bearer(admin.token)),
        ("/v1/chat/completions", f'{{"model": "m", "max_tokens": {HUGE}}}', bearer(api_key)),
        ("/v1/embeddings", f'{{"model": "m", "input": [[{HUGE}]]}}', bearer(api_key)),
    ]
    for path, body, headers in cases:
        async with http.post(server.url + path, data=body.encode(), headers=headers) as r:
            error = await json_error(r, 400)
        assert "digits" in error["message"], (path, error)
    assert await written(http, server.url, admin.token) == before


@pytest.mark.parametrize("body, fragment", [
    ('{"a": ' + "[" * 70 + "]" * 70 + ', "username": "x", "password": "y"}', "nested deeper than 64"),
    ("[" * 10_000, "nested"),
    ('{"username": "admin", "password": NaN}', "NaN is not JSON"),
    ('{"username": "admin", "password": Infinity}', "Infinity is not JSON"),
    ('{"username": "admin", "username": "root", "password": "x"}', "appears twice"),
    ('\ufeff{"username": "admin", "password": "x"}', "malformed JSON"),
], ids=["nesting-70", "nesting-10000", "nan", "infinity", "repeated-key", "bom"])
async def test_json_outside_the_bounds_is_a_400(server, http, body: str, fragment: str):
    async with http.post(f"{server.url}/v2/auth/login", data=body.encode()) as r:
        error = await json_error(r, 400)
    assert fragment in error["message"], error


async def test_large_bodies_are_parsed_on_a_thread_of_their_own(server, admin: MaasClient, http, model):
    # 600 KB of args (under /v2's 1 MiB): decoded off the event loop, then judged like any body.
    body = model | {"name": "big", "args": ["--flag"] * 75_000}
    async with http.post(f"{server.url}/v2/models", json=body, headers=bearer(admin.token)) as r:
        assert r.status < 500, await r.text()
    assert inputs._executor is not None
    assert any(t.name.startswith("maas-json") for t in inputs._executor._threads)


def form(part_headers: str, value: bytes, boundary: str = "XyZ") -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n{part_headers}\r\n'.encode()
            + value + f"\r\n--{boundary}--\r\n".encode())


@pytest.mark.parametrize("content_type, body, status", [
    ("multipart/form-data; boundary=XyZ", form("Content-Type: text/plain; charset=nope-9\r\n", b"tiny"), 400),
    ("multipart/form-data; boundary=XyZ", form("Content-Type: text/plain; charset=utf-8\r\n", b"t\xffiny"), 400),
    ("multipart/form-data; boundary=XyZ", form("", b"ti\x00ny"), 400),
    ("multipart/form-data; boundary=XyZ",
     form("Content-Type: multipart/mixed; boundary=Q\r\n", b"--Q\r\n\r\nx\r\n--Q--"), 400),
    ("multipart/form-data; boundary=XyZ", form("Content-Type: application/octet-stream\r\n", b"tiny"), 400),
    ("multipart/form-data", form("", b"tiny"), 400),
    ("multipart/form-data; boundary=XyZ", form("", b"tiny"), 404),  # well formed: the model does not exist
], ids=["unknown-charset", "not-utf8", "nul", "nested-multipart", "binary-part", "no-boundary", "well-formed"])
async def test_a_hostile_upload_form_is_a_4xx(server, api_key: str, http, content_type: str, body: bytes, status: int):
    async with http.post(f"{server.url}/v1/audio/transcriptions", data=body,
                         headers=bearer(api_key) | {"Content-Type": content_type}) as r:
        await json_error(r, status)


# --- body size per route class --------------------------------------------------------------------------------


async def test_a_60_mb_anonymous_body_is_refused_from_its_content_length_without_being_read(server):
    # Only the headers and 15 bytes go out: the answer comes without the server waiting for the rest.
    request = (b"POST /v2/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 60000000\r\n\r\n" + b'{"username": "a')
    status, headers, body = await raw_exchange(server.config.port, request, read_timeout=5)
    assert status == 413 and headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "too_large" and error["details"] == {"limit": inputs.ANONYMOUS_MAX_BODY}


@pytest.mark.parametrize("path, size, limit, auth", [
    ("/v2/auth/login", 16 * 1024 + 1, inputs.ANONYMOUS_MAX_BODY, "none"),
    ("/v2/models", 1024**2 + 1, inputs.MANAGEMENT_MAX_BODY, "admin"),
    ("/v1/chat/completions", 64 * 1024**2 + 1, 64 * 1024**2, "key"),
    ("/v1/audio/transcriptions", 64 * 1024**2 + 1, 64 * 1024**2, "key"),
], ids=["anonymous", "v2", "v1", "upload"])
async def test_each_route_class_has_its_limit(server, admin: MaasClient, api_key: str, path: str, size: int,
                                              limit: int, auth: str):
    token = {"none": None, "admin": admin.token, "key": api_key}[auth]
    credentials = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {size}\r\n").encode() + credentials + b"\r\n{"
    status, _, body = await raw_exchange(server.config.port, request, read_timeout=5)
    assert status == 413, body
    message = json.loads(body)["error"]["message"]
    assert str(limit) in message and ("an upload" in message) == path.endswith("transcriptions"), message


async def test_expect_100_continue_over_the_limit_gets_its_413_instead_of_the_invitation(server):
    request = (b"POST /v2/auth/login HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: 60000000\r\n\r\n")
    status, _, body = await raw_exchange(server.config.port, request, read_timeout=5)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    small = b'{"username": "admin", "password": "wrong"}'
    request = (b"POST /v2/auth/login HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: %d\r\n\r\n" % len(small))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
    try:
        writer.write(request)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(small)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 401")
    finally:
        writer.close()


@pytest.mark.parametrize("encoding, body", [("gzip", b"abcde"), ("deflate", b"\x00\x01garbage")], ids=["gzip", "deflate"])
async def test_a_body_that_breaks_while_read_is_a_400(server, http, encoding: str, body: bytes):
    async with http.post(f"{server.url}/v2/auth/login", data=body, headers={"Content-Encoding": encoding}) as r:
        assert (await json_error(r, 400))["code"] == "bad_body"


async def test_a_chunked_body_is_cut_off_at_the_limit_while_read(server, http):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"username": "admin", "password": "'
        for _ in range(64):  # 64 KiB, four times the anonymous limit, with no Content-Length
            yield b"x" * 1024
        yield b'"}'

    async with http.post(f"{server.url}/v2/auth/login", data=chunks()) as r:
        error = await json_error(r, 413)
    assert error["code"] == "too_large"
    async with http.post(f"{server.url}/v2/auth/login", json={"username": "admin", "password": "wrong"}) as r:
        await json_error(r, 401)  # a body under the limit is read as before


# --- headers ---------------------------------------------------------------------------------------------------


async def test_an_oversized_header_is_a_json_431_and_nothing_of_it_is_logged(server, caplog):
    secret = "maas_leakcheck_" + "S3CR3T" * 4000  # 24 KB: over the 16 KiB a header may take
    caplog.set_level(logging.DEBUG)
    request = f"GET /v2/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
    status, headers, body = await raw_exchange(server.config.port, request)
    assert status == 431 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "header_too_large"
    # A request line too long is its own error; and the server still answers afterwards.
    status, _, body = await raw_exchange(server.config.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and json.loads(body)["error"]["code"] == "request_line_too_long"
    status, _, body = await raw_exchange(server.config.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    formatter = logging.Formatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "refused an unparsable request" in logged  # the refusal is logged ...
    assert "leakcheck" not in logged and "S3CR3T" not in logged and "aaaaaaaa" not in logged  # ... not its content


@pytest.mark.parametrize("header", [b"Authorization: Bearer maas_\xff\xfe_secret", b"x-api-key: maas_\xc3\x28_secret",
                                    b"Authorization: Bearer maas_\xed\xa0\x80_secret"],
                         ids=["bearer-not-utf8", "api-key-not-utf8", "bearer-surrogate"])
async def test_a_token_that_is_not_text_is_a_401(server, header: bytes):
    status, headers, body = await raw_exchange(server.config.port, b"GET /v2/models HTTP/1.1\r\nHost: x\r\n"
                                               + header + b"\r\n\r\n")
    assert status == 401 and headers["content-type"].startswith("application/json"), body
    assert json.loads(body)["error"]["code"] == "unauthorized"


async def test_a_malformed_request_is_a_json_400(server):
    status, headers, body = await raw_exchange(server.config.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Header: 1\r\n\r\n")
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "bad_http_request"


# --- methods ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v2/models", {"GET", "POST"}),
    ("POST", "/v2/workers/w1", {"GET", "DELETE"}),
    ("DELETE", "/v1/chat/completions", {"POST"}),
    ("POST", "/healthz", {"GET"}),
])
async def test_an_undeclared_method_is_a_405_with_allow(server, admin: MaasClient, http, method: str, path: str,
                                                       allowed: set[str]):
    async with http.request(method, server.url + path, headers=bearer(admin.token)) as r:
        error = await json_error(r, 405)
        assert set(r.headers["Allow"].split(",")) == allowed
    assert method in error["message"]


# --- strict types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", ["2", True, 2.0, [2], None], ids=["string", "true", "float", "list", "null"])
async def test_replicas_must_be_an_integer(server, admin: MaasClient, http, model, replicas: Any):
    before = await written(http, server.url, admin.token)
    async with http.post(f"{server.url}/v2/models", json=model | {"replicas": replicas},
                         headers=bearer(admin.token)) as r:
        error = await json_error(r, 422)  # like every other field error (see server/api/errors.py)
    assert [d["field"] for d in error["details"]] == ["replicas"], error
    async with http.post(f"{server.url}/v2/models", json=model, headers=bearer(admin.token)) as r:
        assert r.status == 201, await r.text()
    if replicas is not None:  # PATCH's replicas may be null (unchanged)
        async with http.patch(f"{server.url}/v2/models/m", json={"replicas": replicas},
                              headers=bearer(admin.token)) as r:
            await json_error(r, 422)
    async with http.get(f"{server.url}/v2/models/m", headers=bearer(admin.token)) as r:
        assert (await r.json())["replicas"] == 0
    assert before != await written(http, server.url, admin.token)  # the valid create went through


async def test_strict_bodies_still_take_json_strings_for_dates_and_enums(server, admin: MaasClient, http, model):
    async with http.post(f"{server.url}/v2/keys", json={"name": "k1", "scopes": ["inference"], "expires_in_days": 3},
                         headers=bearer(admin.token)) as r:
        assert r.status == 201, await r.text()
    async with http.post(f"{server.url}/v2/models", json=model | {"placement_strategy": "binpack",
                                                                  "categories": ["llm"]},
                         headers=bearer(admin.token)) as r:
        assert r.status == 201, await r.text()
    async with http.post(f"{server.url}/v2/keys", json={"name": "k2", "expires_in_days": "3"},
                         headers=bearer(admin.token)) as r:
        await json_error(r, 422)


# --- the document of it all ------------------------------------------------------------------------------------


async def test_openapi_documents_every_served_route_with_streams_errors_and_constraints(server, http):
    async with http.get(f"{server.url}/openapi.json") as r:
        doc = await r.json()
    paths = doc["paths"]
    assert {"/healthz", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions",
            "/v1/audio/transcriptions", "/v2/gateway/authorize"} <= set(paths)
    assert "application/x-ndjson" in paths["/v2/watch"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "multipart/form-data" in paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    operations = [op for item in paths.values() for op in item.values()]
    assert len({op["operationId"] for op in operations}) == len(operations)
    for op in operations:
        assert {"4XX", "503"} <= set(op["responses"]), op["summary"]
    limit = next(p for p in paths["/v2/events"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
    assert "get_v2_models_name" in paths["/v2/models"]["post"]["responses"]["201"]["links"]
    # The route table is checked against the router when the app is made; this is the same from outside.
    served = {(r.method.lower(), r.resource.canonical) for r in server._runner.app.router.routes()
              if r.method != "HEAD"}
    assert served == {(method, path) for path, item in paths.items() for method in item}
