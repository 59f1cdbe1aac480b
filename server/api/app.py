"""The aiohttp application: middlewares, the /v2 route table, /v1 gateway, health and OpenAPI."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from aiohttp import web

# Importing a handler module registers its routes in the route table.
from server.api import (agent_api, audit, backends, gateway_api, metrics, operations, resources,  # noqa: F401
                        scheduling, secrets, teams, usage, users, watch)
from server.api import files  # noqa: F401  (model files in the workers' caches: /v2/files)
from server.api import routes_api  # noqa: F401  (model routes: /v2/routes)
from server.api import telemetry  # noqa: F401  (telemetry history, maas doctor)
from server.api import alerts, bench  # noqa: F401  (alerts, silences, webhooks; benchmarks and the rollout gate)
from server.api import limits  # noqa: F401  (gateway limits: /v2/limits, /v2/{keys,teams,models}/NAME/limits)
from server.api.audit import audit_middleware
from server.api.errors import error_middleware, forbidden, unauthorized
from server.api.inputs import BodyLimits, expect_handler, input_middleware
from server.api.routing import EVENT_STREAM, PRINCIPAL_KEY, ROUTES, SERVER_KEY, Handler, openapi_document, route
from server.api.stale_reads import LastGoodReads, stale_read_middleware
from server.higress.objects import MODEL_HEADER

# Which credential kinds each route accepts, and the scope a user's key needs there.
_ALLOWED = {
    "user": {"user"},
    "inference": {"user"},
    "worker": {"worker"},
    "registrar": {"registrar"},
    "user_or_worker": {"user", "worker"},
}
_SCOPE = {"user": "management", "user_or_worker": "management", "inference": "inference"}


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    required = getattr(request.match_info.handler, "__maas_auth__", "none")
    if required == "none":
        return await handler(request)
    token = bearer_token(request)
    if token is None:
        raise unauthorized("missing credentials: send 'Authorization: Bearer <token>'")
    if not token.isascii():  # tokens are ASCII; other bytes (even undecodable ones) are no credential
        raise unauthorized("malformed credentials: a token is ASCII")
    principal = await request.app[SERVER_KEY].auth.authenticate(token)
    if principal is None:
        raise unauthorized("invalid, expired or revoked credentials")
    if principal.kind not in _ALLOWED[required]:
        raise forbidden(f"this endpoint is not for {principal.kind} credentials")
    scope = _SCOPE.get(required)
    if principal.kind == "user" and scope not in principal.scopes:
        raise forbidden(f"this API key lacks the {scope!r} scope")
    request[PRINCIPAL_KEY] = principal
    return await handler(request)


HEALTH = {"type": "object", "required": ["status", "version", "leader", "database"], "properties": {
    "status": {"type": "string", "enum": ["ok", "degraded"]}, "version": {"type": "string"},
    "leader": {"type": "boolean"}, "database": {"type": "string", "enum": ["ok", "unavailable"]},
    "database_error": {"type": "string"}}}
OPENAI_MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "required": ["id"]}}}}
OPENAI_REQUEST = {"type": "object", "required": ["model"], "properties": {
    "model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"}}}
OPENAI_UPLOAD = {"type": "object", "required": ["model", "file"], "properties": {
    "model": {"type": "string", "minLength": 1}, "file": {"type": "string", "contentMediaType": "application/octet-stream"}}}
ANY_OBJECT = {"type": "object"}


@route("GET", "/healthz", "Liveness: this server answers; whether its database does, and whether it leads",
       auth="none", response=HEALTH)
async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    leading = bool(server.leadership and server.leadership.is_leader)
    # 200 while the database is down too: this server still answers; the body says what is missing.
    database = await server.database_status()
    return web.json_response({"status": "ok" if database["database"] == "ok" else "degraded",
                              "version": server.version, "leader": leading, **database})


_OPENAPI_KEY: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)


@route("GET", "/openapi.json", "This document", auth="none", response=ANY_OBJECT)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[_OPENAPI_KEY])


def _document_routes_registered_elsewhere() -> None:
    """The routes other modules add to the router, in the table for the OpenAPI document."""
    from server.gateway import proxy

    def describe(method: str, path: str, handler: Handler, summary: str, **kwargs: Any) -> None:
        route(method, path, summary, registered_elsewhere=True, **kwargs)(handler)

    describe("GET", "/metrics", metrics.metrics_handler, "Prometheus metrics of the cluster and this server",
             auth="none", content={"text/plain": None})
    describe("GET", "/v1/models", proxy.list_models, "OpenAI: the models this key may call that serve now",
             auth="inference", response=OPENAI_MODELS)
    for path in proxy.JSON_ENDPOINTS:
        streams = path in proxy.STREAMING_ENDPOINTS
        answer: dict[str, Any] = {"application/json": ANY_OBJECT}
        if streams:
            answer[EVENT_STREAM] = None  # "stream": true: server-sent events, relayed as they come
        if path == "/v1/audio/speech":
            answer = {"audio/*": None, "application/octet-stream": None}
        describe("POST", path, proxy.proxy, f"OpenAI {path[4:]}: relayed to the least busy instance of the model"
                 + ("; a stream of server-sent events with \"stream\": true" if streams else ""),
                 auth="inference", body=OPENAI_REQUEST, content=answer, also=(502,))
    for path in proxy.MULTIPART_ENDPOINTS:
        describe("POST", path, proxy.proxy, f"OpenAI {path[4:]}: an upload relayed to an instance of the model",
                 auth="inference", body=OPENAI_UPLOAD, body_content_type="multipart/form-data",
                 content={"application/json": ANY_OBJECT, "text/plain": None}, also=(502,))
    for method in ("GET", "POST"):
        describe(method, "/v2/gateway/authorize", gateway_api.authorize,
                 "Higress forward auth: 200 when the key may call the model named in the header", auth="inference",
                 headers={MODEL_HEADER: "the model the call is for"},
                 response={"type": "object", "required": ["allowed"], "properties": {
                     "allowed": {"type": "boolean"}, "key": {"type": ["string", "null"]}}})


_document_routes_registered_elsewhere()


def _check_documented(app: web.Application) -> None:
    """Every route the router serves is in the table (so in /openapi.json), and nothing more."""
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}  # add_get's HEAD goes with its GET
    documented = {(r.method, r.path) for r in ROUTES}
    if served != documented:
        raise RuntimeError(f"routes served but not in the route table: {sorted(served - documented)}; "
                           f"in the table but not served: {sorted(documented - served)}")


def body_limits(config: Any) -> BodyLimits:
    return BodyLimits(gateway=config.gateway_max_body_mb * 1024**2, upload=config.gateway_max_upload_mb * 1024**2)


def _wrapped(handler: Handler, middlewares: tuple[Callable[..., Any], ...]) -> Handler:
    """`handler` inside `middlewares` (the first outermost), as aiohttp chains an app's middlewares; it keeps
    the handler's attributes (__maas_auth__)."""
    for middleware in reversed(middlewares):
        handler = functools.update_wrapper(functools.partial(middleware, handler=handler), handler)
    return handler


def create_app(server: Any) -> web.Application:
    from server.gateway.proxy import add_gateway_routes

    limits = body_limits(server.config)
    # Inputs before auth: an oversized or malformed request costs no credential check.
    # Inside auth: a stale answer is only ever given to the identity that got it fresh.
    # The audit and the stale reads are about /v2 alone: they wrap its handlers (inside auth, as the
    # last middlewares would) rather than sit in every request's chain; the gateway pays for neither.
    stale_reads = stale_read_middleware(LastGoodReads())
    audit = audit_middleware(lambda: server.config.audit_retention_days)
    middlewares = [error_middleware, input_middleware(limits, ROUTES), auth_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=limits.largest())
    app[SERVER_KEY] = server
    app[_OPENAPI_KEY] = openapi_document(server.version)
    expect = expect_handler(limits)
    for r in ROUTES:
        if not r.registered_elsewhere:
            handler = _wrapped(r.handler, (audit, stale_reads)) if r.path.startswith("/v2/") else r.handler
            app.router.add_route(r.method, r.path, handler, expect_handler=expect)
    add_gateway_routes(app)
    gateway_api.add_gateway_admin_routes(app)
    metrics.add_metrics_routes(app)
    _check_documented(app)
    return app
