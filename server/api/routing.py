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


# Media types of the streams (their operations say so instead of application/json).
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
Schema = type[BaseModel] | dict[str, Any]  # a model, or a JSON schema written out


@dataclass(frozen=True)
class Query:
    """A query parameter: what it means, and the values it takes (a JSON schema)."""

    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


def integer(low: int, high: int, default: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    return schema if default is None else schema | {"default": default}


def one_of(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def comma_list(*values: str) -> dict[str, Any]:
    """Comma-separated names out of `values` (at least one)."""
    choice = "|".join(v.replace(".", r"\.") for v in values)
    return {"type": "string", "pattern": f"^({choice})(,({choice}))*$"}


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    body: Schema | None = None
    response: Schema | None = None
    response_list: bool = False
    status: int = 200
    query: dict[str, str | Query] = field(default_factory=dict)
    tag: str = ""
    # Non-JSON answers: media type -> schema (None: any content); replaces the JSON response.
    content: dict[str, Schema | None] | None = None
    body_content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # required request headers: name -> description
    # Statuses other than 4xx and 503 the route may answer with (502 where it relays to a worker).
    also: tuple[int, ...] = ()
    registered_elsewhere: bool = False  # added to the router by its own module; here to be documented


ROUTES: list[Route] = []


def route(method: str, path: str, summary: str, *, auth: Auth = "user", body: Schema | None = None,
          response: Schema | None = None, response_list: bool = False, status: int = 200,
          query: dict[str, str | Query] | None = None, tag: str = "", content: dict[str, Schema | None] | None = None,
          body_content_type: str = "application/json", headers: dict[str, str] | None = None,
          also: tuple[int, ...] = (), registered_elsewhere: bool = False) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, handler, summary, auth, body, response, response_list, status,
                            query or {}, tag or path.split("/")[2 if path.startswith("/v") else 1],
                            content, body_content_type, headers or {}, also, registered_elsewhere))
        handler.__maas_auth__ = auth  # type: ignore[attr-defined]
        return handler
    return register


def _openai_error_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]},
                       "param": {"type": ["string", "null"]}}}}}


def operation_id(r: Route) -> str:
    """method_path_words, e.g. get_v2_models_name: unique, and stable while the route is."""
    words = [w.strip("{}").replace(".", "_").replace("-", "_") for w in r.path.split("/") if w]
    return "_".join([r.method.lower(), *words])


def _links(creator: Route) -> dict[str, Any]:
    """OpenAPI links from what a POST creates to the operations on it (a client, or a stateful fuzzer,
    follows them): POST /v2/models -> GET /v2/models/{name}, ... The new object's key is the response
    field named like the path parameter, else its `name`; the creator's own path parameters carry over."""
    if creator.method != "POST" or not isinstance(creator.response, type) or creator.response_list:
        return {}
    fields = creator.response.model_fields
    links: dict[str, Any] = {}
    for r in ROUTES:
        rest = r.path[len(creator.path):]
        if not (r.path.startswith(creator.path) and rest.startswith("/{")):
            continue
        key = rest[2:rest.index("}")]
        field_name = key if key in fields else "name" if "name" in fields else None
        if field_name is None:
            continue
        parameters = {p[1:-1]: f"$request.path.{p[1:-1]}" for p in creator.path.split("/") if p.startswith("{")}
        parameters[key] = f"$response.body#/{field_name}"
        links[operation_id(r)] = {"operationId": operation_id(r), "parameters": parameters}
    return links


def openapi_document(version: str) -> dict[str, Any]:
    """OpenAPI 3.1 of every route in the table: parameters with their constraints, bodies, the media
    types of streams, and the errors each may answer with (4xx, 503; 502 where it relays)."""
    from pydantic.json_schema import models_json_schema

    from server.schemas import ErrorResponse

    def schemas_of(r: Route) -> list[Any]:
        return [r.body, r.response, *(r.content or {}).values()]

    models: set[type[BaseModel]] = {ErrorResponse}
    for r in ROUTES:
        models.update(m for m in schemas_of(r) if isinstance(m, type))
    ordered = sorted(models, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in ordered], ref_template="#/components/schemas/{model}")

    def ref(schema: Schema) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{schema.__name__}"} if isinstance(schema, type) else schema

    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"operationId": operation_id(r), "summary": r.summary, "tags": [r.tag], "responses": {}}
        if r.auth != "none":
            op["security"] = [{"bearer": []}]
        params: list[dict[str, Any]] = [
            {"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for p in r.path.split("/") if p.startswith("{")]
        for name, spec in r.query.items():
            q = spec if isinstance(spec, Query) else Query(spec)
            params.append({"name": name, "in": "query", "required": q.required, "schema": q.schema,
                           "description": q.description})
        params += [{"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": text}
                   for name, text in r.headers.items()]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {r.body_content_type: {"schema": ref(r.body)}}}
        if r.content is not None:
            content = {kind: ({"schema": ref(schema)} if schema is not None else {}) for kind, schema in r.content.items()}
            op["responses"][str(r.status)] = {"description": "OK", "content": content}
        elif r.response is not None:
            schema = ref(r.response)
            if r.response_list:
                schema = {"type": "object", "required": ["items"],
                          "properties": {"items": {"type": "array", "items": schema}}}
            op["responses"][str(r.status)] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
            if links := _links(r):
                op["responses"][str(r.status)]["links"] = links
        else:
            op["responses"][str(r.status)] = {"description": "OK", "content": {"application/json": {
                "schema": {"type": "object"}}}}
        error = _openai_error_schema() if r.path.startswith("/v1/") else ref(ErrorResponse)
        errors = {"4XX": "refused: the error says why (bad input, credentials, missing object, conflict, too large)",
                  "503": "the database (or, for /v1, every instance of the model) is unavailable now; try again"}
        errors |= {str(status): {502: "the worker or backend it relays to failed"}.get(status, "error")
                   for status in r.also}
        for status, text in errors.items():
            op["responses"][status] = {"description": text, "content": {"application/json": {"schema": error}}}
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
