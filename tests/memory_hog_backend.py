"""A custom backend whose process holds a known amount of memory (tests/test_memory_drift.py): it
allocates --megabytes of RAM (written, so resident), serves /health and an OpenAI-style chat answer
with usage, and nothing else.

    python tests/memory_hog_backend.py --host 127.0.0.1 --port PORT --megabytes 200
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    held = b"\x01" * (args.megabytes << 20)  # every page written: resident, counted in RSS

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send({"status": "ok", "held_bytes": len(held)})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send({"id": "hog", "object": "chat.completion", "model": "hog",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})

        def log_message(self, *_: object) -> None:
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
