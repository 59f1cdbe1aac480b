"""A small real OpenAI-style chat server for the alert and bench tests, launched as a `custom:NAME` backend
through the normal deploy path. It streams `max_tokens` one-word chunks, waiting `--first-token-delay`
seconds before the first and `--token-delay` between the others (a slower spec is one argument away), or
exits at once with `--crash` (a crash loop).

    python tests/bench_backend.py --host 127.0.0.1 --port PORT --model-name NAME [--first-token-delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aiohttp import web


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    count = int(body.get("max_tokens") or 16)
    options = request.app["options"]
    if not body.get("stream"):
        await asyncio.sleep(options.first_token_delay + options.token_delay * (count - 1))
        return web.json_response({"id": "x", "object": "chat.completion", "created": int(time.time()),
                                  "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "length",
                                  "message": {"role": "assistant", "content": " ".join(["tok"] * count)}}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(options.first_token_delay)
    for n in range(count):
        if n:
            await asyncio.sleep(options.token_delay)
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                 "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="bench")
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--crash", action="store_true", help="exit at once with status 3")
    options = parser.parse_args()
    if options.crash:
        print("bench_backend: crashing on purpose (--crash)", file=sys.stderr)
        sys.exit(3)
    app = web.Application()
    app["options"] = options
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=options.host, port=options.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
