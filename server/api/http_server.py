"""The HTTP server around the app: requests aiohttp cannot parse get a JSON error, and the log gets no part of them.

aiohttp answers an unparsable request (a header over its size limit, a malformed request line) with a
text/plain 400 and logs the parser's exception, whose message quotes the first 100 bytes of the
offending line: for an `Authorization` header, the bearer token. Here the answer is the API's JSON
error (431 for a header too large, 414 for a request line too long) and the log line names only
the kind of error and the peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8190  # aiohttp's default
MAX_HEADER_FIELD = 16 * 1024  # one header's name and value together (long bearer tokens fit)
MAX_HEADERS = 128


def _refusal(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request the parser refused; nothing of its content."""
    if isinstance(exc, LineTooLong):
        # The limit it carries tells which line it was (the two limits differ on purpose).
        if str(MAX_HEADER_FIELD) == str(exc.args[1] if len(exc.args) > 1 else ""):
            return 431, "header_too_large", f"a request header is longer than {MAX_HEADER_FIELD} bytes"
        return 414, "request_line_too_long", f"the request line is longer than {MAX_REQUEST_LINE} bytes"
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
        return 431, "too_many_headers", f"more than {MAX_HEADERS} request headers"
    return 400, "bad_http_request", "the request is not valid HTTP/1.1"


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a server fault: logged whole
        status, code, text = _refusal(exc)
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(level, "refused an unparsable request from %s: %s (%s)", request.remote, code, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent")
        response = web.Response(status=status, content_type="application/json",
                                text=json.dumps({"error": {"code": code, "message": text, "details": None}}))
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, handler: Any, *, request_factory: Any, handler_cancellation: bool,
                 loop: asyncio.AbstractEventLoop, **handler_kwargs: Any) -> None:
        super().__init__(handler, request_factory=request_factory, handler_cancellation=handler_cancellation,
                         loop=loop, **handler_kwargs)
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._handler_kwargs)


class MaasAppRunner(web.AppRunner):
    """web.AppRunner whose connections answer unparsable requests with JSON errors (see the module)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_REQUEST_LINE)
        kwargs.setdefault("max_field_size", MAX_HEADER_FIELD)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # runs the app's startup and freezes it
        handler_kwargs = {k: v for k, v in self._kwargs.items() if k != "handler_cancellation"}
        return _Server(made.request_handler, request_factory=made.request_factory,
                       handler_cancellation=made.handler_cancellation, loop=asyncio.get_running_loop(),
                       **handler_kwargs)
