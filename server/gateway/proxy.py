"""The OpenAI-compatible `/v1` proxy (and Anthropic's `/v1/messages`).

Per request: authenticate (cached), resolve the name (a model, or a model route drawn between its
targets), pick the running instance with the fewest requests in flight, pass the body through,
stream responses back chunk by chunk, meter usage. No database work happens here; the routing
table, the routes and keys are kept current by the bus.

A model route tries its drawn target first, then its other targets, then its fallbacks: a model
without a running instance is skipped, and one that fails or answers 5xx before any byte reached
the client hands the request to the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from time import perf_counter
from typing import Any

from aiohttp import web

from server.api.errors import ApiError, bad_request, forbidden
from server.api.inputs import form_field, parse_json_body
from server.api.routing import principal_of, server_of
from server.gateway.routing_table import Alias, Target
from server.gateway.upstream import UpstreamError, UpstreamStream
from server.schemas.backend_traits import OPTIONAL_APIS
from server.services import access

log = logging.getLogger(__name__)

_RETRY_STATUSES = {502, 503}
# Endpoints whose streamed responses can carry usage (OpenAI's stream_options.include_usage).
_USAGE_IN_STREAM = {"/v1/chat/completions", "/v1/completions"}
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
_USAGE_MARK = b'"usage"'
_USAGE_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*\{')
_RAW_DECODER = json.JSONDecoder()
_MODEL_FIELD = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"')
# Endpoint -> the model category that serves it (ModelSpec.categories).
CATEGORY_OF = {"/v1/chat/completions": "llm", "/v1/completions": "llm", "/v1/embeddings": "embedding",
               "/v1/rerank": "reranker", "/v1/audio/transcriptions": "speech_to_text",
               "/v1/audio/speech": "text_to_speech", "/v1/images/generations": "image",
               "/v1/responses": "llm", "/v1/messages": "llm"}
JSON_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
                  "/v1/audio/speech", "/v1/images/generations", "/v1/responses", "/v1/messages")
MULTIPART_ENDPOINTS = ("/v1/audio/transcriptions",)
STREAMING_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


class _Upstream(Exception):
    """The upstream failed before anything reached the client: another instance may try."""


class _Call:
    """One request through the gateway, passed down instead of a dozen arguments (and kept off the
    aiohttp request, whose items cost more): who asks, through which route (or ""), the model and team
    that serve it now, its limits' ticket, and what it came to for the metrics and the history."""

    __slots__ = ("principal", "route", "model", "team", "fallback_on_5xx", "ticket", "answered_by",
                 "completion_tokens")

    def __init__(self, principal: Any):
        self.principal = principal
        self.route = ""
        self.model = ""  # a label once the name is known to be a model: bodies must not mint label values
        self.team: str | None = None
        self.fallback_on_5xx = False  # a route has somewhere else to go when the model fails
        self.ticket: Any = None  # server/gateway/limits.py's Ticket, once admitted
        self.answered_by: int | None = None  # the instance
        self.completion_tokens: int | None = None


async def list_models(request: web.Request) -> web.Response:
    table = server_of(request).routes
    principal = principal_of(request)
    data = [{"id": name, "object": "model", "created": table.created.get(name, 0), "owned_by": "maas",
             "categories": sorted(table.models[name].categories), "state": table.state_of(name)}
            for name in table.serving_models() if principal.may_use_model(name, table.models[name].team)]
    for alias in table.serving_aliases():
        if principal.may_use_model(alias.name, alias.team):
            served = [table.models[m] for m in alias.models + alias.fallbacks if m in table.models]
            data.append({"id": alias.name, "object": "model", "created": 0, "owned_by": "maas",
                         "categories": sorted(set().union(*(m.categories for m in served))),
                         "route": {"targets": list(alias.models), "fallbacks": list(alias.fallbacks)}})
    return web.json_response({"object": "list", "data": data})


async def proxy(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    started = perf_counter()
    call = _Call(principal_of(request))
    status = 500
    try:
        response = await _proxy(request, server, call)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        if call.ticket is not None:  # an admitted request's error carries the x-ratelimit-* headers too
            exc.headers = {**server.limits.headers_of(call.ticket), **exc.headers}
        raise
    except asyncio.CancelledError:  # the client left (nginx's 499)
        status = 499
        raise
    finally:
        if call.ticket is not None:
            server.limits.release(call.ticket)
        elapsed = perf_counter() - started
        server.routes.stats.observe(call.model, status, elapsed)
        server.telemetry.history.observe_request(call.answered_by, elapsed, call.completion_tokens)


def _head(server: Any, call: _Call, content_type: str) -> dict[str, str]:
    """The headers of an answer: its type, and the x-ratelimit-* ones when limits apply."""
    if call.ticket is None:
        return {"Content-Type": content_type}
    return {"Content-Type": content_type, **server.limits.headers_of(call.ticket)}


def _not_found(name: str) -> ApiError:
    return ApiError(404, "model_not_found", f"the model {name!r} does not exist")


async def _proxy(request: web.Request, server: Any, call: _Call) -> web.StreamResponse:
    principal = call.principal
    path = request.path
    body = await request.read()
    payload: dict[str, Any] | None = None
    expected = "a JSON object with a 'model' string"
    if path in MULTIPART_ENDPOINTS:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise bad_request("send multipart/form-data with a 'model' field")
        name = await form_field(body, content_type, "model")  # bounded, and off the loop when large
        if not name:
            raise bad_request("the form has no 'model' field")
    else:
        payload = await parse_json_body(body, expected)  # bounded, and off the loop when large
        name = payload.get("model")
        if name.__class__ is not str or not name:
            raise bad_request(f"the body must be {expected}")
    table = server.routes
    alias: Alias | None = table.aliases.get(name) if table.aliases else None
    if alias is not None:
        if access.team_access(principal, alias.team) is None:  # other teams' routes do not show
            raise _not_found(name)
        if not principal.may_use_model(name, alias.team):
            raise forbidden(f"this API key may not use the model {name!r}")
        candidates = alias.candidates(table.rng)
    else:
        candidates = (name,)

    streamed = payload is not None and payload.get("stream") is True
    client_wants_usage = True
    if streamed and path in _USAGE_IN_STREAM:
        options = payload.get("stream_options")  # type: ignore[union-attr]
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not client_wants_usage:  # ask for it so usage is always known; the extra chunk is not relayed
            if "stream_options" not in payload and body.rstrip().endswith(b"}"):  # type: ignore[operator]
                # Spliced in rather than re-serialized: the body is a JSON object without that key.
                body = body[:body.rindex(b"}")] + _INCLUDE_USAGE
                payload["stream_options"] = {"include_usage": True}  # the same, for a re-encoding below
            else:
                payload["stream_options"] = {**(options if isinstance(options, dict) else {}),  # type: ignore[index]
                                             "include_usage": True}
                body = b""  # encoded below

    category = CATEGORY_OF[path]
    content_type = request.headers.get("Content-Type", "application/json")
    failure = ""
    forwarded = False
    for model in candidates:
        routes = table.models.get(model)
        if alias is None:
            if routes is None or access.team_access(principal, routes.team) is None:  # other teams' models do not show
                raise _not_found(name)
            if not principal.may_use_model(name, routes.team):
                raise forbidden(f"this API key may not use the model {name!r}")
        elif routes is None:  # a target deleted since the route was written
            failure = failure or f"{model!r} does not exist"
            continue
        call.model = model
        problem = _unsupported(model, routes, path, category)
        if problem is not None:
            if alias is None:
                raise problem
            failure = failure or problem.message
            continue
        if call.ticket is None:  # once per request, not again for a route's fallback
            call.ticket = server.limits.admit(principal, model, routes.team)  # or a 429 naming the limit
        targets = routes.ordered()
        if not targets:
            if alias is None:  # an autoscaled model is held while a replica starts (a manual one: 503 at once)
                targets = await server.cold_start.hold(name, routes)
            else:
                failure = failure or f"{model!r} has no running instance"
                continue
        send = body
        if payload is not None and (alias is not None or not body):  # the target's name goes on (vLLM checks it)
            send = _with_model(body, payload, model)  # a form is relayed as sent: its model field names the route
        call.route = alias.name if alias is not None else ""
        call.team, call.fallback_on_5xx = routes.team, alias is not None
        forwarded = True

        # The least loaded instance over a pooled connection; on failure before any byte reached
        # the client, once more on another instance (the same one if it is alone) over a fresh
        # connection, since backends close pooled keep-alive connections at will.
        for attempt, fresh in ((0, False), (1, True)):
            # The retry asks the table again: a target taken out meanwhile (drained by a scale-down, a preemption)
            # is not tried a second time while another serves.
            target = targets[0] if attempt == 0 else next((t for t in routes.ordered() if t is not target), target)
            try:
                if streamed:  # relayed as it comes
                    response = await _forward_stream(request, server, call, target, send, content_type,
                                                     client_wants_usage, fresh)
                else:
                    response = await _forward_plain(request, server, call, target, send, content_type, fresh)
            except _Upstream as exc:
                failure = f"{model!r}: {exc}" if alias is not None else str(exc)
                table.failed(target)  # passive health: enough failures in a row take it out
                log.info("instance %s of %s failed before answering (%s); trying another", target.instance_id, model,
                         exc)
                continue
            table.answered(target)
            call.answered_by = target.instance_id
            return response
    if not forwarded:  # no model of the route could take the request
        raise ApiError(503, "no_running_instance", f"no model of the route {name!r} can serve it now: {failure}")
    server.usage.record(principal, call.model, None, call.route, call.team)
    raise ApiError(502, "upstream_unavailable", f"no instance of {name!r} answered: {failure}")


def _with_model(body: bytes, payload: dict[str, Any], model: str) -> bytes:
    """The JSON body with its top-level "model" set to `model`. Spliced into the bytes when that key is
    the only "model" in them and no \\u escape could hide another spelling of it (a quote inside a JSON
    string is escaped, so a raw `"model"` followed by a colon is a key): the rest of the body goes on
    byte for byte. Re-encoded otherwise (`body` empty: the payload changed)."""
    if body and body.count(b'"model"') == 1 and b"\\u" not in body:
        found = _MODEL_FIELD.search(body)
        if found is not None:
            end = body.find(b'"', found.end())  # model and route names hold no quote or backslash
            if end > 0:
                return b"%s%s%s" % (body[:found.end()], model.encode(), body[end:])
    return json.dumps({**payload, "model": model}, ensure_ascii=False).encode()


def _unsupported(model: str, routes: Any, path: str, category: str) -> ApiError | None:
    """A 400 when the model does not serve this endpoint: its category, or its backend's APIs."""
    if category not in routes.categories:
        served = ", ".join(sorted(routes.categories))
        return ApiError(400, "model_not_supported", f"the model {model!r} does not serve {path}: it serves {served}; "
                        f"{path} needs a model deployed with category {category}")
    if path in OPTIONAL_APIS and path not in routes.apis:
        return ApiError(400, "model_not_supported", f"the model {model!r} does not serve {path}: its backend does not "
                        "answer that API")
    return None


def _key(server: Any, target: Target) -> bytes:
    """The instance's key as a header line: llama.cpp and vLLM answer only the gateway (a backend without
    a key ignores it)."""
    return server.backend_keys.header(target.instance_id) if server.backend_keys is not None else b""


async def _forward_plain(request: web.Request, server: Any, call: _Call, target: Target, body: bytes,
                         content_type: str, fresh: bool) -> web.Response:
    """A whole response: over the lean pooled client (server/gateway/upstream.py)."""
    target.outstanding += 1
    try:
        try:
            upstream = await server.routes.upstream.request(target.host, target.port, request.path, body,
                                                            content_type, fresh, _key(server, target),
                                                            server.gateway_timeout)
        except UpstreamError as exc:
            if exc.answered:  # the backend had begun to answer: it may have done the work, do not repeat it
                server.usage.record(call.principal, call.model, None, call.route, call.team)
                raise ApiError(502, "upstream_failed", f"the instance of {call.model!r} failed while answering: {exc}")
            raise _Upstream(str(exc)) from None
        except TimeoutError:
            raise _Upstream(f"no answer within {server.gateway_timeout:g} s") from None
        if upstream.status in _RETRY_STATUSES or (call.fallback_on_5xx and upstream.status >= 500):
            raise _Upstream(f"HTTP {upstream.status}")
        kind = upstream.headers.get("content-type", "application/json")
        usage = _usage_of(upstream.body) if upstream.status < 400 and kind.startswith("application/json") else None
        server.usage.record(call.principal, call.model, usage, call.route, call.team)
        _note_tokens(call, usage)
        return web.Response(body=upstream.body, status=upstream.status, headers=_head(server, call, kind))
    finally:
        target.outstanding -= 1


async def _forward_stream(request: web.Request, server: Any, call: _Call, target: Target, body: bytes,
                          content_type: str, client_wants_usage: bool, fresh: bool) -> web.StreamResponse:
    """A streamed response, relayed as it comes (over a pooled connection unless `fresh`). The gateway
    timeout bounds the whole exchange (head and body together), as it did with aiohttp's total timeout."""
    deadline = asyncio.get_running_loop().time() + server.gateway_timeout
    target.outstanding += 1
    try:
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await server.routes.upstream.stream(target.host, target.port, request.path, body,
                                                               content_type, _key(server, target), fresh)
        except UpstreamError as exc:
            raise _Upstream(str(exc)) from None
        except TimeoutError:
            raise _Upstream(f"no answer within {server.gateway_timeout:g} s") from None
        try:
            if upstream.status in _RETRY_STATUSES or (call.fallback_on_5xx and upstream.status >= 500):
                raise _Upstream(f"HTTP {upstream.status}")
            kind = upstream.headers.get("content-type", "application/json")
            if kind.startswith("text/event-stream"):
                return await _relay_stream(request, server, call, upstream, kind, client_wants_usage, deadline)
            try:  # an error or a whole answer after all
                async with asyncio.timeout_at(deadline):
                    data = b"".join([chunk async for chunk in upstream.body()])
            except (UpstreamError, TimeoutError) as exc:
                server.usage.record(call.principal, call.model, None, call.route, call.team)
                raise ApiError(502, "upstream_failed", f"the instance of {call.model!r} failed while answering: {exc}")
            usage = _usage_of(data) if upstream.status < 400 and kind.startswith("application/json") else None
            server.usage.record(call.principal, call.model, usage, call.route, call.team)
            _note_tokens(call, usage)
            return web.Response(body=data, status=upstream.status, headers=_head(server, call, kind))
        finally:
            server.routes.upstream.release(upstream)  # kept alive when the stream ended cleanly
    finally:
        target.outstanding -= 1


async def _relay_stream(request: web.Request, server: Any, call: _Call, upstream: UpstreamStream,
                        content_type: str, client_wants_usage: bool, deadline: float) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers={**_head(server, call, content_type),
                                                                   "Cache-Control": "no-cache"})
    await response.prepare(request)
    usage: dict[str, Any] | None = None
    pending = b""
    ended = False
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in upstream.body():
                if not pending and chunk.endswith(b"\n\n") and _USAGE_MARK not in chunk:
                    data = chunk  # whole events without usage: the common case, as they come
                else:
                    pending += chunk
                    # Relay whole server-sent events as they complete: no buffering beyond one event.
                    *events, pending = pending.split(b"\n\n")
                    out = []
                    for event in events:
                        if _USAGE_MARK in event:
                            found, usage_only = _stream_usage(event)
                            if found is not None:  # Anthropic's counts come in two events: the later ones win
                                usage = found if usage is None else {**usage, **found}
                            if usage_only and not client_wants_usage:
                                continue
                        out.append(event + b"\n\n")
                    data = b"".join(out)
                if upstream.finished and not pending:  # the last bytes go out with the body's end: one write
                    ended = True
                    await response.write_eof(data)
                elif data:
                    await response.write(data)
            if pending:
                await response.write(pending)
        if not ended:
            await response.write_eof()
    except ConnectionResetError:  # the client went away: stop reading upstream too
        log.debug("client left during a stream of %s", call.model)
    except (UpstreamError, TimeoutError) as exc:  # bytes already went out: all we can do is end it
        log.warning("instance of %s failed in the middle of a stream: %s", call.model, exc)
    finally:
        server.usage.record(call.principal, call.model, usage, call.route, call.team)
        _note_tokens(call, usage)
    return response


def _note_tokens(call: _Call, usage: dict[str, Any] | None) -> None:
    tokens = usage.get("completion_tokens") if usage.__class__ is dict else None
    if tokens.__class__ is int and tokens >= 0:  # an int, not a bool
        call.completion_tokens = tokens


def _usage_of(data: bytes) -> dict[str, Any] | None:
    """The top-level `usage` of a whole JSON answer (OpenAI's prompt/completion_tokens, the Responses
    and Messages APIs' input/output_tokens); an answer without the key is not parsed.

    When `"usage"` occurs once, unescaped, only its object is decoded, not the whole answer (a long one
    costs tens of microseconds to parse): a quote inside a JSON string is escaped, so the one raw
    occurrence is a key (an answer nesting its only usage deeper is then counted by it, as a stream's is)."""
    at = data.find(_USAGE_MARK)
    if at < 0:
        return None
    if data.find(_USAGE_MARK, at + 1) < 0 and data[at - 1:at] != b"\\":
        value = _USAGE_VALUE.match(data, at + len(_USAGE_MARK))
        if value is not None:
            try:
                usage, _ = _RAW_DECODER.raw_decode(data[value.end() - 1:].decode())
            except ValueError:  # not UTF-8 or not JSON after all: the whole answer says
                usage = None
            if isinstance(usage, dict):
                return usage
    try:
        document = json.loads(data)
    except ValueError:
        return None
    usage = document.get("usage") if isinstance(document, dict) else None
    return usage if isinstance(usage, dict) else None


def _stream_usage(event: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(usage, whether the event is a usage-only chunk) for one server-sent event: OpenAI's usage chunk,
    the Responses API's response.completed (response.usage), Anthropic's message_start (message.usage)
    and message_delta (usage)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                return None, False
            if not isinstance(data, dict):
                return None, False
            if isinstance(data.get("usage"), dict):
                return data["usage"], not data.get("choices")
            for holder in ("response", "message"):
                inner = data.get(holder)
                if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                    return inner["usage"], False
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
