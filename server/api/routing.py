"""The route table: each handler declares its path, auth and wire types once.

The table registers the aiohttp routes, drives the auth middleware and generates
the OpenAPI document, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["none", "user", "inference", "worker", "registrar", "user_or_worker"]


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    response_list: bool = False
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)
    tag: str = ""


ROUTES: list[Route] = []


def route(method: str, path: str, summary: str, *, auth: Auth = "user", body: type[BaseModel] | None = None,
          response: type[BaseModel] | None = None, response_list: bool = False, status: int = 200,
          query: dict[str, str] | None = None, tag: str = "") -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, handler, summary, auth, body, response, response_list, status,
                            query or {}, tag or path.split("/")[2]))
        handler.__maas_auth__ = auth  # type: ignore[attr-defined]
        return handler
    return register


def openapi_document(version: str) -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    from server.schemas import ErrorResponse

    models: set[type[BaseModel]] = {ErrorResponse}
    for r in ROUTES:
        models.update(m for m in (r.body, r.response) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in ordered], ref_template="#/components/schemas/{model}")
    ref = lambda m: {"$ref": f"#/components/schemas/{m.__name__}"}  # noqa: E731
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag], "responses": {}}
        if r.auth != "none":
            op["security"] = [{"bearer": []}]
        params = [{"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in r.path.split("/") if p.startswith("{")]
        params += [{"name": k, "in": "query", "required": False, "schema": {"type": "string"}, "description": v}
                   for k, v in r.query.items()]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(r.body)}}}
        if r.response is not None:
            schema = ref(r.response)
            if r.response_list:
                schema = {"type": "object", "properties": {"items": {"type": "array", "items": schema}}}
            op["responses"][str(r.status)] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        else:
            op["responses"][str(r.status)] = {"description": "OK"}
        op["responses"]["4XX"] = {"description": "error", "content": {"application/json": {"schema": ref(ErrorResponse)}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "MaaS-Base API", "version": version},
        "paths": paths,
        "components": {"schemas": top.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


SERVER_KEY: web.AppKey[Any] = web.AppKey("maas_server", object)
PRINCIPAL_KEY: web.RequestKey[Any] = web.RequestKey("principal", object)


def server_of(request: web.Request) -> Any:
    """The running MaasServer (db, bus, authenticator, config, gateway)."""
    return request.app[SERVER_KEY]


def principal_of(request: web.Request) -> Any:
    return request[PRINCIPAL_KEY]


def json_out(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = {"items": [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]}
    return web.json_response(data, status=status)
