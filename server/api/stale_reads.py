"""Reads while the database is down: the last answer this server gave to the same GET, marked stale.

Every successful `/v2` GET answer is remembered (bounded, least recently used first out) under the caller's
identity and the full path with its query, so nobody is ever shown what their own credentials could not read.
When the database is unavailable the same GET gets that answer back with `X-Maas-Stale-Seconds` (its age)
instead of a 503; writes still get the 503. Remembering costs a dictionary store of bytes already made.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from server.api.routing import PRINCIPAL_KEY
from server.db.errors import database_unavailable

STALE_HEADER = "X-Maas-Stale-Seconds"
MAX_ENTRIES = 512
MAX_BYTES = 32 * 1024**2
# Streams and per-call views: a stale copy of these would mislead (logs, watch) or never fit.
# Matched by route, not by a substring of the path (a model named "logs-summary" is remembered).
_NOT_REMEMBERED = frozenset({"/v2/watch", "/v2/instances/{ref}/logs"})


class LastGoodReads:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0

    def remember(self, key: tuple[Any, ...], body: bytes, content_type: str) -> None:
        if len(body) > self.max_bytes // 8:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._entries[key] = (time.monotonic(), body, content_type)
        self._bytes += len(body)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self._bytes -= len(dropped)

    def recall(self, key: tuple[Any, ...]) -> tuple[float, bytes, str] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry


def _key(request: web.Request) -> tuple[Any, ...] | None:
    principal = request.get(PRINCIPAL_KEY)
    if principal is None:
        return None
    return (principal.kind, principal.user_id, principal.worker_id, principal.api_key_id, request.path_qs)


def stale_read_middleware(reads: LastGoodReads) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if (request.method != "GET" or not request.path.startswith("/v2/") or resource is None
                or resource.canonical in _NOT_REMEMBERED):
            return await handler(request)
        try:
            response = await handler(request)
        except Exception as exc:
            key = _key(request)
            entry = reads.recall(key) if key is not None and database_unavailable(exc) else None
            if entry is None:
                raise
            saved_at, body, content_type = entry
            return web.Response(body=body, content_type=content_type,
                                headers={STALE_HEADER: f"{time.monotonic() - saved_at:.0f}"})
        key = _key(request)
        if (key is not None and type(response) is web.Response and response.status == 200
                and isinstance(response.body, bytes)):
            reads.remember(key, response.body, response.content_type)
        return response

    return middleware
