"""A small real OpenAI- and Anthropic-shaped server for the model route tests, launched as a
`custom:NAME` backend through the normal deploy path. It does no inference: it answers chat
completions, the Responses API and the Messages API (plain or streamed) with fixed token counts and
says who served (`served_by`, its model name) and what it was asked for (`asked_for`, the body's
`model`), so a test can follow each request. A model whose name contains "broken" answers every POST
with HTTP 500 before any byte of a body.

    python tests/routes_backend.py --host 127.0.0.1 --port PORT --model-name NAME
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

CHAT_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
RESPONSES_USAGE = {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7}
MESSAGES_INPUT, MESSAGES_OUTPUT = 6, 2


def _sse(data: dict, event: str | None = None) -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n"


async def _events(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def answer(request: web.Request) -> web.StreamResponse:
    served_by = request.app["model_name"]
    if "broken" in served_by:
        return web.json_response({"error": {"message": "this backend is broken", "type": "server_error"}}, status=500)
    body = await request.json()
    asked = body.get("model")
    mark = {"served_by": served_by, "asked_for": asked}
    stream = body.get("stream") is True
    if request.path == "/v1/chat/completions":
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": asked, **mark}
        if not stream:
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, "model": asked, **mark,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "hi there"}}],
                                      "usage": CHAT_USAGE})
        events = [_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                              "finish_reason": None}]}),
                  _sse({**chunk, "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]})]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(_sse({**chunk, "choices": [], "usage": CHAT_USAGE}))
        return await _events(request, events + [b"data: [DONE]\n\n"])
    if request.path == "/v1/responses":
        done = {"id": "r1", "object": "response", "created_at": 0, "model": asked, "status": "completed", **mark,
                "output": [{"type": "message", "id": "m1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hi there", "annotations": []}]}],
                "usage": RESPONSES_USAGE}
        if not stream:
            return web.json_response(done)
        return await _events(request, [
            _sse({"type": "response.created", "response": {**done, "status": "in_progress", "usage": None}},
                 "response.created"),
            _sse({"type": "response.output_text.delta", "delta": "hi there", "item_id": "m1", "output_index": 0,
                  "content_index": 0}, "response.output_text.delta"),
            _sse({"type": "response.completed", "response": done}, "response.completed")])
    # /v1/messages (Anthropic)
    message = {"id": "msg1", "type": "message", "role": "assistant", "model": asked, **mark,
               "content": [{"type": "text", "text": "hi there"}], "stop_reason": "end_turn", "stop_sequence": None}
    if not stream:
        return web.json_response({**message, "usage": {"input_tokens": MESSAGES_INPUT,
                                                       "output_tokens": MESSAGES_OUTPUT}})
    return await _events(request, [
        _sse({"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                   "usage": {"input_tokens": MESSAGES_INPUT, "output_tokens": 1}}},
             "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
             "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
              "usage": {"output_tokens": MESSAGES_OUTPUT}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="fixed")
    args = parser.parse_args()
    app = web.Application()
    app["model_name"] = args.model_name
    app.router.add_get("/health", health)
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        app.router.add_post(path, answer)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
