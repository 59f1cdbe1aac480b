"""A small real speech server for tests, launched as a `custom:NAME` backend through the normal
deploy path: OpenAI's /v1/audio/transcriptions (multipart) and /v1/audio/speech. It does no
speech work; it answers with what it received (sizes, digests, form fields) so tests can check
that the gateway passed every byte through.

    python tests/speech_backend.py --host 127.0.0.1 --port PORT --model-name NAME
"""

from __future__ import annotations

import argparse
import hashlib

from aiohttp import web


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def transcriptions(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/form-data"):
        return web.json_response({"error": {"message": "send multipart/form-data", "type": "invalid_request_error"}},
                                 status=400)
    fields: dict[str, str] = {}
    upload: dict[str, object] = {}
    reader = await request.multipart()
    async for part in reader:
        if part.filename:
            data = await part.read()
            upload = {"filename": part.filename, "content_type": part.headers.get("Content-Type"),
                      "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            fields[part.name or ""] = await part.text()
    if not upload:
        return web.json_response({"error": {"message": "no file", "type": "invalid_request_error"}}, status=400)
    return web.json_response({"text": f"{upload['bytes']} bytes heard", "file": upload, "fields": fields,
                              "served_by": request.app["model_name"]})


async def speech(request: web.Request) -> web.Response:
    body = await request.json()
    # A WAV-looking header and the input echoed: binary out, checkable by the test.
    audio = b"RIFF\x00\x00\x00\x00WAVE" + str(body.get("input", "")).encode() + bytes(range(256))
    return web.Response(body=audio, content_type="audio/wav")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="speech")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024**2)
    app["model_name"] = args.model_name
    app.router.add_get("/health", health)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/speech", speech)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
