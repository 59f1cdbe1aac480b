"""The OpenAI-compatible `/v1` proxy.

Per request: authenticate (cached), pick the running instance with the fewest requests in
flight, pass the body through, stream responses back chunk by chunk, meter usage. No
database work happens here; the routing table and keys are kept current by the bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
from time import perf_counter
from typing import Any

from aiohttp import web

from server.api.errors import ApiError, bad_request, forbidden
from server.api.inputs import form_field, parse_json_body
from server.api.routing import principal_of, server_of
from server.gateway.routing_table import Target
from server.gateway.upstream import UpstreamError, UpstreamStream
from server.services import access

log = logging.getLogger(__name__)

_RETRY_STATUSES = {502, 503}
_MODEL_KEY: web.RequestKey[str] = web.RequestKey("maas.gateway.model", str)  # for the latency labels
# For the telemetry history (server/telemetry_history.py): which instance answered, and its tokens.
_ANSWERED_KEY: web.RequestKey[int] = web.RequestKey("maas.gateway.answered_by", int)
_TOKENS_KEY: web.RequestKey[int] = web.RequestKey("maas.gateway.completion_tokens", int)
# Endpoints whose streamed responses can carry usage (OpenAI's stream_options.include_usage).
_USAGE_IN_STREAM = {"/v1/chat/completions", "/v1/completions"}
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
# Endpoint -> the model category that serves it (ModelSpec.categories).
CATEGORY_OF = {"/v1/chat/completions": "llm", "/v1/completions": "llm", "/v1/embeddings": "embedding",
               "/v1/rerank": "reranker", "/v1/audio/transcriptions": "speech_to_text",
               "/v1/audio/speech": "text_to_speech", "/v1/images/generations": "image"}
JSON_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
                  "/v1/audio/speech", "/v1/images/generations")
MULTIPART_ENDPOINTS = ("/v1/audio/transcriptions",)


class _Upstream(Exception):
    """The upstream failed before anything reached the client: another instance may try."""


async def list_models(request: web.Request) -> web.Response:
    table = server_of(request).routes
    principal = principal_of(request)
    data = [{"id": name, "object": "model", "created": table.created.get(name, 0), "owned_by": "maas",
             "categories": sorted(table.models[name].categories), "state": table.state_of(name)}
            for name in table.serving_models() if principal.may_use_model(name, table.models[name].team)]
    return web.json_response({"object": "list", "data": data})


async def proxy(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    started = perf_counter()
    model = ""  # a label only once the name is known to be a model: bodies must not mint label values
    status = 500
    try:
        response = await _proxy(request, server)
        status = response.status
        model = request.get(_MODEL_KEY, "")
        return response
    except ApiError as exc:
        status = exc.status
        model = request.get(_MODEL_KEY, "")
        raise
    except asyncio.CancelledError:  # the client left (nginx's 499)
        status = 499
        model = request.get(_MODEL_KEY, "")
        raise
    finally:
        server.routes.stats.observe(model, status, perf_counter() - started)
        server.telemetry.history.observe_request(request.get(_ANSWERED_KEY), perf_counter() - started,
                                                 request.get(_TOKENS_KEY))


async def _proxy(request: web.Request, server: Any) -> web.StreamResponse:
    principal = principal_of(request)
    body = await request.read()
    payload: dict[str, Any] | None = None
    expected = "a JSON object with a 'model' string"
    if request.path in MULTIPART_ENDPOINTS:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise bad_request("send multipart/form-data with a 'model' field")
        name = await form_field(body, content_type, "model")  # bounded, and off the loop when large
        if not name:
            raise bad_request("the form has no 'model' field")
    else:
        payload = await parse_json_body(body, expected)  # bounded, and off the loop when large
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise bad_request(f"the body must be {expected}")
    routes = server.routes.models.get(name)
    if routes is None or access.team_access(principal, routes.team) is None:  # other teams' models do not show
        raise ApiError(404, "model_not_found", f"the model {name!r} does not exist")
    if not principal.may_use_model(name, routes.team):
        raise forbidden(f"this API key may not use the model {name!r}")
    request[_MODEL_KEY] = name
    category = CATEGORY_OF[request.path]
    if category not in routes.categories:
        served = ", ".join(sorted(routes.categories))
        raise ApiError(400, "model_not_supported", f"the model {name!r} does not serve {request.path}: it serves "
                       f"{served}; {request.path} needs a model deployed with category {category}")
    targets = routes.ordered()
    if not targets:  # an autoscaled model is held while a replica starts (a manual one: 503 at once)
        targets = await server.cold_start.hold(name, routes)

    client_wants_usage = True
    if payload is not None and payload.get("stream") is True and request.path in _USAGE_IN_STREAM:
        options = payload.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not client_wants_usage:  # ask for it so usage is always known; the extra chunk is not relayed
            if "stream_options" not in payload and body.rstrip().endswith(b"}"):
                # Spliced in rather than re-serialized: the body is a JSON object without that key.
                body = body[:body.rindex(b"}")] + _INCLUDE_USAGE
            else:
                payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                body = json.dumps(payload).encode()

    # The least loaded instance over a pooled connection; on failure before any byte reached
    # the client, once more on another instance (the same one if it is alone) over a fresh
    # connection, since backends close pooled keep-alive connections at will.
    second = targets[1 % len(targets)]
    failure = ""
    content_type = request.headers.get("Content-Type", "application/json")
    streamed = payload is not None and payload.get("stream") is True
    for target, fresh in ((targets[0], False), (second, True)):
        try:
            if streamed:  # a connection of its own each time
                response = await _forward_stream(request, server, principal, name, target, body, content_type,
                                                 client_wants_usage)
            else:
                response = await _forward_plain(request, server, principal, name, target, body, content_type, fresh)
        except _Upstream as exc:
            failure = str(exc)
            server.routes.failed(target)  # passive health: enough failures in a row take it out
            log.info("instance %s of %s failed before answering (%s); trying another", target.instance_id, name, exc)
            continue
        server.routes.answered(target)
        request[_ANSWERED_KEY] = target.instance_id
        return response
    server.usage.record(principal, name, None)
    raise ApiError(502, "upstream_unavailable", f"no instance of {name!r} answered: {failure}")


def _key(server: Any, target: Target) -> bytes:
    """The instance's key as a header line: llama.cpp and vLLM answer only the gateway (a backend without
    a key ignores it)."""
    return server.backend_keys.header(target.instance_id) if server.backend_keys is not None else b""


async def _forward_plain(request: web.Request, server: Any, principal: Any, name: str, target: Target, body: bytes,
                         content_type: str, fresh: bool) -> web.Response:
    """A whole response: over the lean pooled client (server/gateway/upstream.py)."""
    target.outstanding += 1
    try:
        try:
            async with asyncio.timeout(server.gateway_timeout):
                upstream = await server.routes.upstream.request(target.host, target.port, request.path, body,
                                                                content_type, fresh, _key(server, target))
        except UpstreamError as exc:
            if exc.answered:  # the backend had begun to answer: it may have done the work, do not repeat it
                server.usage.record(principal, name, None)
                raise ApiError(502, "upstream_failed", f"the instance of {name!r} failed while answering: {exc}")
            raise _Upstream(str(exc)) from None
        except TimeoutError:
            raise _Upstream(f"no answer within {server.gateway_timeout:g} s") from None
        if upstream.status in _RETRY_STATUSES:
            raise _Upstream(f"HTTP {upstream.status}")
        kind = upstream.headers.get("content-type", "application/json")
        usage = _usage_of(upstream.body) if upstream.status < 400 and kind.startswith("application/json") else None
        server.usage.record(principal, name, usage)
        _note_tokens(request, usage)
        return web.Response(body=upstream.body, status=upstream.status, headers={"Content-Type": kind})
    finally:
        target.outstanding -= 1


async def _forward_stream(request: web.Request, server: Any, principal: Any, name: str, target: Target, body: bytes,
                          content_type: str, client_wants_usage: bool) -> web.StreamResponse:
    """A streamed response, relayed as it comes, over a connection of its own. The gateway timeout
    bounds the whole exchange (head and body together), as it did with aiohttp's total timeout."""
    deadline = asyncio.get_running_loop().time() + server.gateway_timeout
    target.outstanding += 1
    try:
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await server.routes.upstream.stream(target.host, target.port, request.path, body,
                                                               content_type, _key(server, target))
        except UpstreamError as exc:
            raise _Upstream(str(exc)) from None
        except TimeoutError:
            raise _Upstream(f"no answer within {server.gateway_timeout:g} s") from None
        try:
            if upstream.status in _RETRY_STATUSES:
                raise _Upstream(f"HTTP {upstream.status}")
            kind = upstream.headers.get("content-type", "application/json")
            if kind.startswith("text/event-stream"):
                return await _relay_stream(request, server, principal, name, upstream, kind, client_wants_usage,
                                           deadline)
            try:  # an error or a whole answer after all
                async with asyncio.timeout_at(deadline):
                    data = b"".join([chunk async for chunk in upstream.body()])
            except (UpstreamError, TimeoutError) as exc:
                server.usage.record(principal, name, None)
                raise ApiError(502, "upstream_failed", f"the instance of {name!r} failed while answering: {exc}")
            usage = _usage_of(data) if upstream.status < 400 and kind.startswith("application/json") else None
            server.usage.record(principal, name, usage)
            _note_tokens(request, usage)
            return web.Response(body=data, status=upstream.status, headers={"Content-Type": kind})
        finally:
            upstream.close()
    finally:
        target.outstanding -= 1


async def _relay_stream(request: web.Request, server: Any, principal: Any, name: str, upstream: UpstreamStream,
                        content_type: str, client_wants_usage: bool, deadline: float) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status,
                                  headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await response.prepare(request)
    usage: dict[str, Any] | None = None
    pending = b""
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in upstream.body():
                if not pending and chunk.endswith(b"\n\n") and b'"usage"' not in chunk:
                    await response.write(chunk)  # whole events without usage: the common case, as they come
                    continue
                pending += chunk
                # Relay whole server-sent events as they complete: no buffering beyond one event.
                *events, pending = pending.split(b"\n\n")
                out = []
                for event in events:
                    if b'"usage"' in event:
                        found, usage_only = _stream_usage(event)
                        usage = found or usage
                        if usage_only and not client_wants_usage:
                            continue
                    out.append(event + b"\n\n")
                if out:
                    await response.write(b"".join(out))
            if pending:
                await response.write(pending)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: stop reading upstream too
        log.debug("client left during a stream of %s", name)
    except (UpstreamError, TimeoutError) as exc:  # bytes already went out: all we can do is end it
        log.warning("instance of %s failed in the middle of a stream: %s", name, exc)
    finally:
        server.usage.record(principal, name, usage)
        _note_tokens(request, usage)
    return response


def _note_tokens(request: web.Request, usage: dict[str, Any] | None) -> None:
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        request[_TOKENS_KEY] = tokens


def _usage_of(data: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document.get("usage") if isinstance(document, dict) else None


def _stream_usage(event: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(usage, whether the event is a usage-only chunk) for one server-sent event."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                return None, False
            if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                return data["usage"], not data.get("choices")
    return None, False


async def _close_upstream(app: web.Application) -> None:
    from server.api.routing import SERVER_KEY

    app[SERVER_KEY].routes.upstream.close()


def add_gateway_routes(app: web.Application) -> None:
    app.on_cleanup.append(_close_upstream)
    for handler in (list_models, proxy):
        handler.__maas_auth__ = "inference"  # type: ignore[attr-defined]
    app.router.add_get("/v1/models", list_models)
    for path in JSON_ENDPOINTS + MULTIPART_ENDPOINTS:
        app.router.add_post(path, proxy)
