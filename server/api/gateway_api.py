"""Gateway administration: the Higress objects, and the forward-auth check Higress calls."""

from __future__ import annotations

from aiohttp import web

from server.api.errors import bad_request, forbidden
from server.api.permissions import require_cluster_role
from server.api.routing import json_out, principal_of, route, server_of
from server.higress.objects import MODEL_HEADER
from server.higress.sync import current_objects


@route("GET", "/v2/gateway/higress", "The Higress objects (McpBridge, Ingress, WasmPlugin) for what runs now, and how their sync fares")
async def higress_objects(request: web.Request) -> web.Response:
    require_cluster_role(request, "read the Higress configuration")
    server = server_of(request)
    sync = [status.as_dict() for status in server.higress_status]
    return json_out({"items": await current_objects(server), "sync": sync})


async def authorize(request: web.Request) -> web.Response:
    """Higress ext-auth (forward_auth): 200 when the key may call the model in the header."""
    model = request.headers.get(MODEL_HEADER, "")
    if not model:
        raise bad_request(f"missing the {MODEL_HEADER} header")
    principal = principal_of(request)
    routes = server_of(request).routes.models.get(model)
    if not principal.may_use_model(model, routes.team if routes is not None else None):
        raise forbidden(f"this API key may not use the model {model!r}")
    return web.json_response({"allowed": True, "key": principal.api_key_name})


authorize.__maas_auth__ = "inference"  # type: ignore[attr-defined]


def add_gateway_admin_routes(app: web.Application) -> None:
    for method in ("GET", "POST"):
        app.router.add_route(method, "/v2/gateway/authorize", authorize)
