"""A fast OpenAI-compatible server with a fixed answer, for bench/gateway.py --backend fixed.

The tiny llama.cpp model becomes the bottleneck at 64 clients (its throughput drops below the
one-client figure), which hides the gateway's own cost; this server answers
/v1/chat/completions (plain, or streamed as server-sent events with include_usage) in a few
tens of microseconds: asyncio protocol, keep-alive, no framework.

    python bench/backends/openai_fixed.py --host 127.0.0.1 --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json

WORD = "hi"


def _plain(max_tokens: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": "fixed",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join([WORD] * max_tokens)},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": max_tokens, "total_tokens": 5 + max_tokens},
    }).encode()


def _events(max_tokens: int, include_usage: bool) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + json.dumps({"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0,
                                       "model": "fixed", "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}).encode() + b"\n\n"
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": WORD + " "}) for _ in range(max_tokens)]
    events.append(chunk({}, "length"))
    if include_usage:
        events.append(b"data: " + json.dumps({"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0,
                                              "model": "fixed", "choices": [], "usage": {
                                                  "prompt_tokens": 5, "completion_tokens": max_tokens,
                                                  "total_tokens": 5 + max_tokens}}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class Handler(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.respond(head.split(" ", 2), body, "connection: close" in head.lower())

    def respond(self, request_line: list[str], body: bytes, close: bool) -> None:
        method, path = request_line[0], request_line[1]
        if method == "GET" and path == "/health":
            self.send(200, "application/json", b'{"status":"ok"}', close)
        elif method == "POST" and path == "/v1/chat/completions":
            try:
                request = json.loads(body)
                max_tokens = int(request.get("max_tokens") or 16)
            except (ValueError, TypeError, AttributeError):
                self.send(400, "application/json", b'{"error":{"message":"bad request"}}', close)
                return
            if request.get("stream") is True:
                options = request.get("stream_options") or {}
                events = _events(max_tokens, options.get("include_usage") is True)
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                        b"Transfer-Encoding: chunked\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
                self.transport.write(head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
                if close:
                    self.transport.close()
            else:
                self.send(200, "application/json", _plain(max_tokens), close)
        else:
            self.send(404, "application/json", b'{"error":{"message":"not found"}}', close)

    def send(self, status: int, content_type: str, body: bytes, close: bool) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, reason.encode(), content_type.encode(), len(body), b"Connection: close\r\n" if close else b"",
            body))
        if close:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Handler, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()  # a deploy may append the model's args
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
