"""The aiohttp application: middlewares, the /v2 route table, /v1 gateway, health and OpenAPI."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web

# Importing a handler module registers its routes in the route table.
from server.api import (agent_api, backends, gateway_api, metrics, operations, resources,  # noqa: F401
                        scheduling, usage, users, watch)
from server.api.errors import error_middleware, forbidden, unauthorized
from server.api.inputs import BodyLimits, input_middleware
from server.api.routing import PRINCIPAL_KEY, ROUTES, SERVER_KEY, openapi_document
from server.api.stale_reads import LastGoodReads, stale_read_middleware

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


async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    leading = bool(server.leadership and server.leadership.is_leader)
    # 200 while the database is down too: this server still answers; the body says what is missing.
    database = await server.database_status()
    return web.json_response({"status": "ok" if database["database"] == "ok" else "degraded",
                              "version": server.version, "leader": leading, **database})


def body_limits(config: Any) -> BodyLimits:
    return BodyLimits(gateway=config.gateway_max_body_mb * 1024**2, upload=config.gateway_max_upload_mb * 1024**2)


def create_app(server: Any) -> web.Application:
    from server.gateway.proxy import add_gateway_routes

    limits = body_limits(server.config)
    # Inputs before auth: an oversized or malformed request costs no credential check.
    # Inside auth: a stale answer is only ever given to the identity that got it fresh.
    stale_reads = stale_read_middleware(LastGoodReads())
    app = web.Application(middlewares=[error_middleware, input_middleware(limits), auth_middleware, stale_reads],
                          client_max_size=limits.largest())
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    document = openapi_document(server.version)

    async def openapi(_request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", openapi)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    add_gateway_routes(app)
    gateway_api.add_gateway_admin_routes(app)
    metrics.add_metrics_routes(app)
    return app

