"""The OpenAI-compatible `/v1` proxy: API-key auth, routing by `model`, streaming pass-through."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from server.api.errors import ApiError, bad_request, parse_json_object
from server.api.routing import server_of

log = logging.getLogger(__name__)

_FORWARDED_HEADERS = ("Content-Type", "Accept")


async def list_models(request: web.Request) -> web.Response:
    table = server_of(request).routes
    data = [{"id": name, "object": "model", "created": table.created.get(name, 0), "owned_by": "maas"}
            for name in table.serving_models()]
    return web.json_response({"object": "list", "data": data})


async def proxy(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    body = await request.read()
    expected = "a JSON object with a 'model' string"
    payload = parse_json_object(body, expected)
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise bad_request(f"the body must be {expected}")
    name = payload["model"]
    routes = server.routes.models.get(name)
    if routes is None:
        raise ApiError(404, "model_not_found", f"the model {name!r} does not exist")
    targets = routes.ordered()
    if not targets:
        raise ApiError(503, "no_running_instance", f"the model {name!r} has no running instance yet")

    headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
    last_error: Exception | None = None
    # Each target once, plus one extra try: llama.cpp drops keep-alive connections after a
    # stream, so a pooled connection can fail before anything was sent. Retrying is safe then.
    for target in targets + targets[:1]:
        try:
            upstream = await server.http.post(target.base_url + request.path, data=body, headers=headers)
        except (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError) as exc:
            last_error = exc
            continue
        async with upstream:
            return await _relay(request, upstream)
    log.warning("no instance of %s answered: %s", name, last_error)
    raise ApiError(502, "upstream_unreachable", f"no instance of {name!r} answered ({last_error})")


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "application/json")
    if not content_type.startswith("text/event-stream"):
        return web.Response(body=await upstream.read(), status=upstream.status, headers={"Content-Type": content_type})
    response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: stop reading upstream too
        log.debug("client left during a stream from %s", upstream.url)
    finally:
        # llama.cpp closes keep-alive connections after a stream: never pool this one.
        upstream.close()
    return response


def add_gateway_routes(app: web.Application) -> None:
    for handler in (list_models, proxy):
        handler.__maas_auth__ = "user"  # type: ignore[attr-defined]
    app.router.add_get("/v1/models", list_models)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, proxy)
