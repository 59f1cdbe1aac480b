"""A lean HTTP/1.1 client for the gateway's plain (non-streamed) upstream requests.

Measured on this 2-core machine, an aiohttp ClientSession request costs about 300 us of CPU
where the whole aiohttp server side of the gateway costs about 110 us: most of it is generic
machinery (URL and header objects, tracing hooks, cookie handling, timers, payload registry)
that a proxy calling known backends does not need. Here a request is one `transport.write`
of prebuilt bytes on a pooled keep-alive connection, and the response is parsed from the
bytes as they arrive (Content-Length, chunked, or until close).

Streamed requests go over a fresh connection each (llama.cpp closes it after a stream anyway)
and hand the body over as it arrives (`UpstreamPool.stream`). A failure before any response
byte raises UpstreamError so the gateway can retry on another instance over a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import AsyncIterator

STREAM_HIGH_WATER = 1024 * 1024  # pause reading the backend while this much waits for a slow client
IDLE_SECONDS = 4.0  # below llama.cpp's 5 s keep-alive: never reuse a connection it is closing
MAX_HEADER_BYTES = 64 * 1024


class UpstreamError(Exception):
    """Nothing usable came back (connection refused/reset, malformed or truncated response).
    `answered`: some of the response had arrived, so the backend did (some of) the work."""

    answered = False


class _Response:
    __slots__ = ("status", "headers", "body", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, keep_alive: bool):
        self.status, self.headers, self.body, self.keep_alive = status, headers, body, keep_alive


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[_Response] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response: a retry is no longer safe
        self._head: tuple[int, dict[str, str], bool] | None = None
        self._length: int | None = None
        self._chunked = False
        self._body_start = 0

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self.got_bytes = True
        self.buffer += data
        try:
            response = self._parse(eof=False)
        except UpstreamError as exc:
            self.waiter.set_exception(exc)
            self.close()
            return
        if response is not None:
            self.waiter.set_result(response)

    def eof_received(self) -> bool:
        self.closed = True  # the backend closed its side: never reuse (connection_lost follows)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            try:
                response = self._parse(eof=True) if self.got_bytes else None
            except UpstreamError as error:
                self.waiter.set_exception(error)
                return
            if response is not None:
                self.waiter.set_result(response)
            else:
                self.waiter.set_exception(UpstreamError(f"connection closed{': ' + str(exc) if exc else ''}"))

    # --- use --------------------------------------------------------------------------
    async def exchange(self, request: bytes) -> _Response:
        self.buffer.clear()
        self._head, self._length, self._chunked, self._body_start = None, None, False, 0
        self.got_bytes = False
        if self.closed or self.transport is None or self.transport.is_closing():
            # A write on a closing transport is dropped silently: the answer would never come.
            raise UpstreamError("connection closed before the request")
        self.waiter = self.loop.create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self, eof: bool) -> _Response | None:
        buffer = self.buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES or eof:
                    raise UpstreamError("malformed response head")
                return None
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise UpstreamError(f"malformed status line {lines[0][:100]!r}")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            status = int(parts[1])
            connection = headers.get("connection", "").lower()
            keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
            self._head = (status, headers, keep_alive)
            self._body_start = end + 4
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            elif "content-length" in headers:
                try:
                    self._length = int(headers["content-length"])
                except ValueError:
                    raise UpstreamError("malformed Content-Length") from None
            elif status in (204, 304) or 100 <= status < 200:
                self._length = 0
            else:
                self._head = (status, headers, False)  # delimited by the close
        status, headers, keep_alive = self._head
        start = self._body_start
        if self._length is not None:
            if len(buffer) - start >= self._length:
                return _Response(status, headers, bytes(buffer[start:start + self._length]), keep_alive)
            if eof:
                raise UpstreamError("response body cut short")
            return None
        if self._chunked:
            body = self._dechunk(start)
            if body is not None:
                return _Response(status, headers, body, keep_alive)
            if eof:
                raise UpstreamError("chunked response cut short")
            return None
        return _Response(status, headers, bytes(buffer[start:]), False) if eof else None

    def _dechunk(self, position: int) -> bytes | None:
        buffer, out = self.buffer, bytearray()
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            try:
                size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                raise UpstreamError("malformed chunk size") from None
            position = line_end + 2
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", position - 2)
                return bytes(out) if trailer_end >= 0 else None
            if len(buffer) < position + size + 2:
                return None
            out += buffer[position:position + size]
            position += size + 2


class UpstreamStream(asyncio.Protocol):
    """One streamed exchange: `head` resolves to (status, headers); then `body()` yields the
    body's bytes as they arrive (chunked encoding removed)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[tuple[int, dict[str, str]]] = loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._raw = bytearray()
        self._ready: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: Exception | None = None
        self._length: int | None = None  # bytes left, for a Content-Length body
        self._chunked = False
        self._chunk_left = -1  # -1: a chunk-size line is next; -2: the CRLF after a chunk; -3: trailers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._raw += data
        try:
            if not self.head.done():
                end = self._raw.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._raw) > MAX_HEADER_BYTES:
                        raise UpstreamError("malformed response head")
                    return
                self._start(bytes(self._raw[:end]))
                del self._raw[:end + 4]
            self._decode()
        except UpstreamError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(UpstreamError(f"connection closed{': ' + str(exc) if exc else ''}"))
        elif not self._done:
            if self._length is None and not self._chunked:
                self._finish()  # delimited by the close
            else:
                self._fail(UpstreamError("stream cut short"))

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError(f"malformed status line {lines[0][:100]!r}")
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        self.status = int(parts[1])
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            try:
                self._length = int(self.headers["content-length"])
            except ValueError:
                raise UpstreamError("malformed Content-Length") from None
        self.head.set_result((self.status, self.headers))

    def _decode(self) -> None:
        raw = self._raw
        if self._length is not None:
            if raw:
                take = bytes(raw[:self._length])
                del raw[:len(take)]
                self._length -= len(take)
                self._emit(take)
            if self._length == 0:
                self._finish()
            return
        if not self._chunked:
            if raw:
                self._emit(bytes(raw))
                raw.clear()
            return
        while raw:
            if self._chunk_left == -1:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                try:
                    size = int(bytes(raw[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise UpstreamError("malformed chunk size") from None
                del raw[:end + 2]
                self._chunk_left = size if size else -3
            elif self._chunk_left == -2:
                if len(raw) < 2:
                    return
                del raw[:2]
                self._chunk_left = -1
            elif self._chunk_left == -3:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                del raw[:end + 2]
                if end == 0:  # the empty line after the trailers
                    self._finish()
                    return
            else:
                take = bytes(raw[:self._chunk_left])
                del raw[:len(take)]
                self._chunk_left -= len(take)
                if self._chunk_left == 0:
                    self._chunk_left = -2
                self._emit(take)

    def _emit(self, data: bytes) -> None:
        self._ready.append(data)
        self._buffered += len(data)
        if self._buffered > STREAM_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
        self._error, self._done = exc, True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            if self._ready:
                data = b"".join(self._ready)
                self._ready.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield data
                continue
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per backend (host, port)."""

    def __init__(self, connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._prefix: dict[tuple[str, int, str], bytes] = {}

    async def request(self, host: str, port: int, path: str, body: bytes, content_type: str,
                      fresh: bool = False) -> _Response:
        """POST `body`; `fresh` never reuses a pooled connection (for the retry)."""
        key = (host, port)
        connection = None if fresh else self._take(key)
        if connection is None:
            connection = await self._connect(host, port)
        prefix = self._prefix.get((host, port, path))
        if prefix is None:
            prefix = self._prefix[(host, port, path)] = (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\nContent-Length: ").encode("latin-1")
        head = prefix + b"%d\r\nContent-Type: %s\r\n\r\n" % (len(body), content_type.encode("latin-1"))
        try:
            response = await connection.exchange(head + body)
        except UpstreamError as exc:
            connection.close()
            exc.answered = connection.got_bytes
            raise
        except BaseException:
            connection.close()  # cancelled or timed out mid-exchange: its state is unknown
            raise
        if response.keep_alive and not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(key, deque()).append(connection)
        else:
            connection.close()
        return response

    async def stream(self, host: str, port: int, path: str, body: bytes, content_type: str) -> UpstreamStream:
        """POST `body` on a new connection; returns once the response head is in."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, exchange = await loop.create_connection(lambda: UpstreamStream(loop), host, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
        exchange.transport.write(  # type: ignore[union-attr]
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                path.encode("latin-1"), host.encode("latin-1"), port, content_type.encode("latin-1"), len(body), body))
        try:
            await exchange.head
        except BaseException:
            exchange.close()
            raise
        return exchange

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed by now
            if (not connection.closed and connection.transport is not None
                    and not connection.transport.is_closing() and now - connection.idle_since < IDLE_SECONDS):
                return connection
            connection.close()
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(lambda: _Connection(loop), host, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
        return connection

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a backend that is gone."""
        for connection in self._idle.pop((host, port), ()):
            connection.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def idle_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

