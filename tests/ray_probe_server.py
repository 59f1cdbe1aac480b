"""A small real Ray job served as a custom backend (tests/test_ray_multihost.py deploys it over two workers).

It joins the Ray cluster the agents formed (`--ray-address`, else RAY_ADDRESS), waits until `--nodes`
nodes are alive, runs one task pinned to each node (hard node affinity, so a task that cannot run
there fails instead of landing elsewhere) and checks every node answered. Only then does it serve:
GET /health, GET /v1/models and POST /v1/chat/completions (plain or an SSE stream), whose answer
names the nodes the tasks ran on. Any failure exits non-zero with the reason on stderr, which the
agent puts in the instance's error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=1)
def where() -> dict:
    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def run_on_every_node(want: int, seconds: float) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want:
            break
        if time.monotonic() > deadline:
            sys.exit(f"ray probe: {len(alive)} of {want} Ray nodes alive after {seconds:g} s")
        time.sleep(0.5)
    refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote()
            for n in alive]
    results = ray.get(refs, timeout=seconds)
    ran = {r["node_id"] for r in results}
    expected = {n["NodeID"] for n in alive}
    if ran != expected:
        sys.exit(f"ray probe: tasks ran on {sorted(ran)}, expected every node {sorted(expected)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ray-address", default="")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="ray-probe")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--wait", type=float, default=120.0)
    args = parser.parse_args()
    address = args.ray_address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        sys.exit("ray probe: no Ray address (neither --ray-address nor RAY_ADDRESS)")
    ray.init(address=address, _node_ip_address=args.host, logging_level="ERROR", log_to_driver=False)
    results = run_on_every_node(args.nodes, args.wait)
    ips = sorted(r["ip"] for r in results)
    answer = "ran on " + ", ".join(ips)
    print(f"ray probe: {answer}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, json.dumps({"nodes": ips}).encode())
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": args.model_name, "object": "model"}]})
                           .encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/chat/completions":
                self._send(404, b'{"error": "not found"}')
                return
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            base = {"id": "chatcmpl-probe", "created": int(time.time()), "model": args.model_name}
            usage = {"prompt_tokens": 1, "completion_tokens": len(ips), "total_tokens": 1 + len(ips)}
            if request.get("stream"):
                chunks = [{**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer},
                                        "finish_reason": None}]},
                          {**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}]
                body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self._send(200, body.encode(), "text/event-stream")
            else:
                reply = {**base, "object": "chat.completion", "usage": usage,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": "stop"}]}
                self._send(200, json.dumps(reply).encode())

        def log_message(self, *_args: object) -> None:
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
