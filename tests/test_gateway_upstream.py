"""The gateway's upstream client (server/gateway/upstream.py) against raw HTTP servers on 127.0.0.1:
every body framing, keep-alive reuse, EOF from the backend, failures and flow control."""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

import pytest

from server.gateway.upstream import STREAM_HIGH_WATER, UpstreamError, UpstreamPool, UpstreamStream

pytestmark = pytest.mark.timeout(60)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, int, list[int]]:
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded, so a bug fails instead of hanging)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_every_framing_over_one_keep_alive_connection_split_anywhere():
    """Content-Length, chunked (with an extension and trailers), an empty 204: one connection,
    one write per request, whatever the packet boundaries."""
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": 1234}",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies * 2:
            requests.append(await _read_request(reader))
            size = 1 if len(requests) <= 3 else len(reply)  # first round byte by byte, then whole
            for i in range(0, len(reply), size):
                writer.write(reply[i:i + size])
                await writer.drain()

    server, port, connections = await _serve(handler)
    pool = UpstreamPool()
    writes: list[bytes] = []
    try:
        for round in range(2):
            first = await pool.request("127.0.0.1", port, "/v1/x", b'{"m": 1}', "application/json")
            assert (first.status, first.body) == (200, b'{"a": 1234}')
            assert first.headers["content-type"] == "application/json"
            if round == 0:
                connection = pool._idle[("127.0.0.1", port)][0]
                assert connection.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                connection.transport.write = lambda data, write=connection.transport.write: (writes.append(data),
                                                                                          write(data))[-1]
            writes.clear()
            second = await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
            assert (second.status, second.body, "x-t" in second.headers) == (201, b"hello, world", False)
            assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n{}")  # one write: head and body together
            third = await pool.request("127.0.0.1", port, "/v1/x", b"{}", "application/json")
            assert (third.status, third.body) == (204, b"")
        assert connections[0] == 1 and pool.idle_count() == 1
        assert requests[0] == (b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\nContent-Length: 8\r\n"
                               b"Content-Type: application/json\r\n\r\n{\"m\": 1}" % port)
    finally:
        pool.close()
        server.close()


async def test_close_delimited_and_connection_close_are_not_pooled():
    replies = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
               b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here",
               b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close"]
    answered = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(replies[answered[0]])
        answered[0] += 1
        await writer.drain()  # then the close ends the body

    server, port, connections = await _serve(handler)
    pool = UpstreamPool()
    try:
        assert (await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")).body == b"ok"
        assert (await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")).body == b"no length here"
        last = await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")
        assert (last.body, last.keep_alive) == (b"until the close", False)
        assert connections[0] == 3 and pool.idle_count() == 0
    finally:
        pool.close()
        server.close()


async def test_a_connection_the_backend_closed_after_answering_is_never_reused():
    """llama.cpp drops keep-alive after some responses: once its EOF is in, the next request
    goes on a new connection instead of being written into a dead one."""
    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        seen.append(len(seen))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then closes
        await writer.drain()

    server, port, connections = await _serve(handler)
    pool = UpstreamPool()
    try:
        assert (await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")).body == b"ok"
        (pooled,) = pool._idle[("127.0.0.1", port)]
        await _until(lambda: pooled.closed)  # the backend's EOF has arrived
        assert (await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")).body == b"ok"
        assert connections[0] == 2 and seen == [0, 1]
        with pytest.raises(UpstreamError, match="before the request") as refused:  # never written to
            await pooled.exchange(b"POST / HTTP/1.1\r\n\r\n")
        assert not refused.value.answered
    finally:
        pool.close()
        server.close()


@pytest.mark.parametrize("reply, answered, message", [
    (b"", False, "connection closed"),  # nothing came back: safe to retry elsewhere
    (b"HTTP/1.1 200 OK\r\nContent-Len", True, "malformed response head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", True, "cut short"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", True, "cut short"),
    (b"garbage\r\n\r\n", True, "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", True, "malformed response"),
])
async def test_failures_say_whether_the_backend_had_begun_to_answer(reply: bytes, answered: bool, message: str):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    server, port, _ = await _serve(handler)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamError, match=message) as failed:
            await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")
        assert failed.value.answered is answered and pool.idle_count() == 0
    finally:
        pool.close()
        server.close()
    with pytest.raises(UpstreamError, match="cannot connect") as refused:
        await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")
    assert not refused.value.answered


@pytest.mark.parametrize("head, body, wire", [
    (b"Transfer-Encoding: chunked\r\n", b"data: 1\n\ndata: 2\n\n", _chunked(b"data: 1\n\n", b"data: 2\n\n")),
    (b"Content-Length: 6\r\n", b"whole!", b"whole!"),
    (b"", b"until the close", b"until the close"),
])
async def test_streams_hand_over_every_framing(head: bytes, body: bytes, wire: bytes):
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head + b"\r\n")
        for i in range(len(wire)):
            writer.write(wire[i:i + 1])
            await writer.drain()

    server, port, _ = await _serve(handler)
    try:
        exchange = await UpstreamPool().stream("127.0.0.1", port, "/v1/s", b"{}", "application/json")
        assert (exchange.status, exchange.headers["content-type"]) == (200, "text/event-stream")
        assert b"".join([chunk async for chunk in exchange.body()]) == body
        exchange.close()
        assert b"Connection: close\r\n" not in requests[0] and b"Accept: text/event-stream\r\n" in requests[0]
    finally:
        server.close()


async def test_a_stream_connection_is_reused_until_the_backend_drops_them_after_streams():
    """A stream that ended cleanly leaves its connection for the next request (no connect per stream). A
    backend that closes after a stream without saying so (llama.cpp) fails the first reuse before any
    byte; from then on its stream connections ask for the close and are not pooled."""
    drop_after_stream = False
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await _read_request(reader)
            requests.append(request)
            if b"event-stream" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + _chunked(b"data: 1\n\n"))
                await writer.drain()
                if drop_after_stream:
                    await reader.read(1)  # what came next is dropped, unanswered, with the connection
                    return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    server, port, connections = await _serve(handler)
    pool = UpstreamPool()

    async def stream(fresh: bool = False) -> bytes:
        exchange = await pool.stream("127.0.0.1", port, "/v1/s", b"{}", "application/json", fresh=fresh)
        body = b"".join([chunk async for chunk in exchange.body()])
        assert exchange.finished  # the gateway sends the last bytes with the end of its own body
        pool.release(exchange)
        return body

    try:
        assert await stream() == b"data: 1\n\n" and await stream() == b"data: 1\n\n"
        assert (await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")).body == b"ok"
        assert connections[0] == 1  # two streams and a plain request over one connection
        drop_after_stream = True
        assert await stream() == b"data: 1\n\n"  # pooled again: nothing said otherwise
        with pytest.raises(UpstreamError) as dropped:
            await pool.request("127.0.0.1", port, "/x", b"{}", "application/json")
        assert not dropped.value.answered  # the gateway retries it on a fresh connection
        assert await stream(fresh=True) == b"data: 1\n\n"
        assert b"Connection: close\r\n" in requests[-1] and not pool._idle.get(("127.0.0.1", port))
        pool.forget("127.0.0.1", port)  # another backend there may keep them again
        assert not pool._drops_after_stream
    finally:
        pool.close()
        server.close()


async def test_a_stream_cut_short_says_so_and_one_refused_fails_at_the_head():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"data: 1\n\n")[:-5])
        await writer.drain()

    server, port, _ = await _serve(handler)
    try:
        exchange = await UpstreamPool().stream("127.0.0.1", port, "/v1/s", b"{}", "application/json")
        received = []
        with pytest.raises(UpstreamError, match="cut short"):
            async for chunk in exchange.body():
                received.append(chunk)
        assert b"".join(received) == b"data: 1\n\n"
    finally:
        server.close()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await UpstreamPool().stream("127.0.0.1", port, "/v1/s", b"{}", "application/json")


async def test_a_stream_stops_reading_behind_a_slow_consumer():
    size = 4 * STREAM_HIGH_WATER
    payload = bytes(range(256)) * (size // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(payload)
        await writer.drain()

    server, port, _ = await _serve(handler)
    try:
        exchange: UpstreamStream = await UpstreamPool().stream("127.0.0.1", port, "/v1/s", b"{}", "application/json")
        await _until(lambda: exchange._paused or exchange._complete)
        assert exchange._paused and not exchange.transport.is_reading()  # the consumer has not read yet
        assert b"".join([chunk async for chunk in exchange.body()]) == payload
        exchange.close()
    finally:
        server.close()
