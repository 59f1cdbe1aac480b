"""A lean HTTP/1.1 client for the gateway's upstream requests.

Measured on this 2-core machine, an aiohttp ClientSession request costs about 300 us of CPU
where the whole aiohttp server side of the gateway costs about 110 us: most of it is generic
machinery (URL and header objects, tracing hooks, cookie handling, timers, payload registry)
that a proxy calling known backends does not need. Here a request is one `transport.write`
of prebuilt bytes on a pooled keep-alive connection, and the response is parsed as it
arrives by httptools (llhttp, the parser uvicorn uses).

Streamed requests hand the body over as it arrives (`UpstreamPool.stream`) and use the pool too:
a connection whose stream ended cleanly is kept alive for the next request, which saves a TCP
connect and close per stream. llama.cpp drops the connection after a stream without saying so: the
first reuse that fails before any byte marks that backend (`_drops_after_stream`), whose stream
connections are then closed after use, as they always were. A failure before any response byte
raises UpstreamError so the gateway can retry on another instance over a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import AsyncIterator

import httptools

STREAM_HIGH_WATER = 1024 * 1024  # pause reading the backend while this much waits for a slow client
IDLE_SECONDS = 4.0  # below llama.cpp's 5 s keep-alive: never reuse a connection it is closing
MAX_HEADER_BYTES = 64 * 1024  # llhttp sets no limit of its own


class UpstreamError(Exception):
    """Nothing usable came back (connection refused/reset, malformed or truncated response).
    `answered`: some of the response had arrived, so the backend did (some of) the work."""

    answered = False


class _Response:
    __slots__ = ("status", "headers", "body", "keep_alive")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, keep_alive: bool):
        self.status, self.headers, self.body, self.keep_alive = status, headers, body, keep_alive


class UpstreamStream(asyncio.Protocol):
    """One connection to a backend and the exchange on it.

    Streamed (the default): `head` resolves to (status, headers) and `body()` then yields the
    body's bytes as they arrive, reading paused behind a slow consumer. Plain (`stream=False`,
    pooled by UpstreamPool): `exchange()` returns the whole _Response, and the connection can
    serve the next request if the backend keeps it alive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool = True, key: tuple[str, int] = ("", 0)):
        self.loop = loop
        self.stream = stream
        self.key = key  # (host, port): where it goes back to in the pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.streamed = False  # its last exchange was a stream (see UpstreamPool._drops_after_stream)
        self._complete, self._error = False, None  # no exchange before: _begin makes the parser
        self._begin()
        if not stream:
            self._complete = True  # no exchange yet: any byte now is out of step

    def _begin(self) -> None:
        """Fresh state for one request/response. The parser goes on after a response that ended cleanly
        (llhttp resets itself for the next message of a keep-alive connection); after anything else a
        fresh one, so nothing left over from the previous response can leak into this one."""
        if not (self._complete and self._error is None):
            self._parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future = self.loop.create_future()  # stream: (status, headers); plain: _Response
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.got_bytes = False  # any byte of the current response: a retry is no longer safe
        self._head_done = False
        self._head_bytes = 0
        self._complete = False
        self._ready: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._complete:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
            if not self._head_done:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEADER_BYTES:
                    raise UpstreamError("malformed response head: too long")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            what = "malformed status line" if self._parser.get_status_code() == 0 else "malformed response"
            self._fail(UpstreamError(f"{what}: {exc}"))
            self.close()
        except UpstreamError as exc:
            self._fail(exc)
            self.close()

    def eof_received(self) -> bool:
        self.closed = True  # the backend closed its side: never reuse (connection_lost follows)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._complete:
            return
        if not self.got_bytes:
            self._fail(UpstreamError(f"connection closed{': ' + str(exc) if exc else ''}"))
        elif not self._head_done:
            self._fail(UpstreamError("malformed response head: cut short"))
        elif ("content-length" not in self.headers
              and "chunked" not in self.headers.get("transfer-encoding", "").lower()):
            # Delimited by the close. httptools has no llhttp_finish (feed_data(b"") is not an
            # EOF), so the end of such a body is ours to call.
            self.on_message_complete()
        else:
            self._fail(UpstreamError("response cut short"))

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: out of step
            raise UpstreamError("bytes after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # not the trailers after a chunked body
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self._head_done = True
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()  # False for HTTP/1.0, close, or a close-delimited body
        if self.stream and not self.head.done():  # done: cancelled by a timeout
            self.head.set_result((self.status, self.headers))

    def on_body(self, data: bytes) -> None:
        self._ready.append(data)
        if self.stream:
            self._buffered += len(data)
            if self._buffered > STREAM_HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        if self.stream:
            self._wake()
        else:
            body = b"".join(self._ready)
            self._ready.clear()
            if not self.head.done():  # done: cancelled by a timeout
                self.head.set_result(_Response(self.status, self.headers, body, self.keep_alive))

    # --- use --------------------------------------------------------------------------
    def send(self, request: bytes, stream: bool) -> None:
        """Begin one exchange on this connection (new or pooled) in either mode."""
        self.stream = stream
        self._begin()
        if self.closed or self.transport is None or self.transport.is_closing():
            # A write on a closing transport is dropped silently: the answer would never come.
            self._complete = True
            raise UpstreamError("connection closed before the request")
        self.transport.write(request)

    async def exchange(self, request: bytes, timeout: float | None = None) -> _Response:
        """Plain mode: send one request, return the whole response; TimeoutError after `timeout` seconds (a
        timer of its own: asyncio.timeout costs several times more on this path)."""
        timer = self.loop.call_later(timeout, self._fail, TimeoutError()) if timeout is not None else None
        try:
            self.send(request, stream=False)
            return await self.head
        finally:
            self._complete = True  # answered, failed or abandoned: later bytes are out of step
            if timer is not None:
                timer.cancel()

    @property
    def finished(self) -> bool:
        """Stream mode: the whole body has arrived and been handed over; nothing more will come."""
        return self._complete and self._error is None and not self._ready

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly, every byte was handed over, and the backend keeps the connection."""
        return (self._complete and self._error is None and self.keep_alive and not self.closed and not self._ready
                and not self._paused and self.transport is not None and not self.transport.is_closing())

    def _fail(self, exc: Exception) -> None:
        if self._complete:
            return
        self._complete = True
        if not self.head.done():
            self.head.set_exception(exc)
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def body(self) -> AsyncIterator[bytes]:
        """Stream mode: the body's bytes as they arrive (chunked encoding removed)."""
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
            if self._complete:
                if self._error is not None:
                    raise self._error
                return
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per backend (host, port)."""

    def __init__(self, connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], deque[UpstreamStream]] = {}
        self._prefix: dict[tuple[str, int, str], bytes] = {}
        self._drops_after_stream: set[tuple[str, int]] = set()  # backends that close a connection after a stream

    async def request(self, host: str, port: int, path: str, body: bytes, content_type: str,
                      fresh: bool = False, authorization: bytes = b"", timeout: float | None = None) -> _Response:
        """POST `body`; `fresh` never reuses a pooled connection (for the retry). `authorization`: a
        header line (the instance's key, server/services/backend_keys.py), or nothing. TimeoutError when
        the answer is not in within `timeout` seconds, the connection included."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        key = (host, port)
        connection = None if fresh else self._take(key)
        if connection is None:
            connection = await self._connect(host, port, stream=False, timeout=timeout)
        prefix = self._prefix.get((host, port, path))
        if prefix is None:
            prefix = self._prefix[(host, port, path)] = (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\nContent-Length: ").encode("latin-1")
        head = prefix + b"%d\r\nContent-Type: %s\r\n%s\r\n" % (len(body), content_type.encode("latin-1"),
                                                              authorization)
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            response = await connection.exchange(head + body, left)
        except UpstreamError as exc:
            self._failed(connection, exc)
            raise
        except BaseException:
            connection.close()  # cancelled or timed out mid-exchange: its state is unknown
            raise
        connection.streamed = False
        if response.keep_alive and not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(key, deque()).append(connection)
        else:
            connection.close()
        return response

    async def stream(self, host: str, port: int, path: str, body: bytes, content_type: str,
                     authorization: bytes = b"", fresh: bool = False) -> UpstreamStream:
        """POST `body`, over a pooled connection unless `fresh` (or the backend drops connections after a
        stream); returns once the response head is in. Hand the exchange back with `release`."""
        key = (host, port)
        drops = key in self._drops_after_stream
        connection = None if fresh or drops else self._take(key)
        if connection is None:
            connection = await self._connect(host, port, stream=True)
        try:
            connection.send(
                b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n%s%s\r\n%s" % (
                    path.encode("latin-1"), host.encode("latin-1"), port, content_type.encode("latin-1"), len(body),
                    authorization, b"Connection: close\r\n" if drops else b"", body), stream=True)
            await connection.head
        except UpstreamError as exc:
            self._failed(connection, exc)
            raise
        except BaseException:
            connection.close()
            raise
        connection.streamed = True
        return connection

    def release(self, connection: UpstreamStream) -> None:
        """A stream's connection after its exchange: back to the pool when it ended cleanly, else closed."""
        if connection.reusable and connection.key not in self._drops_after_stream:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(connection.key, deque()).append(connection)
        else:
            connection.close()

    def _failed(self, connection: UpstreamStream, exc: UpstreamError) -> None:
        connection.close()
        exc.answered = connection.got_bytes
        if connection.streamed and not connection.got_bytes:  # reused after a stream, and dropped
            self._drops_after_stream.add(connection.key)

    def _take(self, key: tuple[str, int]) -> UpstreamStream | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed by now
            if (not connection.closed and connection.transport is not None
                    and not connection.transport.is_closing() and now - connection.idle_since < IDLE_SECONDS):
                return connection
            connection.close()
        return None

    async def _connect(self, host: str, port: int, stream: bool, timeout: float | None = None) -> UpstreamStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)):
                _, connection = await loop.create_connection(lambda: UpstreamStream(loop, stream, (host, port)),
                                                             host, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
        return connection

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a backend that is gone, and drop its request prefixes."""
        for connection in self._idle.pop((host, port), ()):
            connection.close()
        self._drops_after_stream.discard((host, port))  # the next backend there may keep them
        for key in [k for k in self._prefix if k[:2] == (host, port)]:
            del self._prefix[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def idle_count(self) -> int:
        return sum(len(d) for d in self._idle.values())
