"""Autoscaling with real llama.cpp: cold starts from zero, a load step, and no failed request through scaling.

    .venv/bin/python bench/autoscale.py [--cold-starts 6] [--clients 16] [--max-tokens 24]

Starts `maas start` (SQLite, local agent) in its own process and deploys the tiny llama.cpp model
autoscaled (min 0, max 3, target 8 requests in flight per replica, short idle timeout). Then:

1. Cold starts: the model idles to zero replicas (and stays there 1.5 s), then one request (plain and streamed in turn) is
   sent; it is held by the gateway while a replica starts. Its latency minus the backend's own start
   time (its instance's `Starting` to `Running` events: the agent launching llama.cpp until it answers
   its health check) is the cold start overhead: autoscaler, controller, scheduler, agent and gateway.
2. A load step: min 1; 4 clients, then 16 (target 8: two replicas). The time from the step to the second
   replica running (so served by the gateway), and that minus its backend's own start.
3. Under the steady 16 clients the target goes to 16 (one replica is enough): the extra replica is drained
   and removed. Every request of steps 2 and 3 is counted; a failure is any answer but 200.

Prints a table and, last, `RESULT cold_start_overhead_s=<p50> scale_up_s=<s> failed=<n> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

NAME = "elastic"


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str, admin: dict[str, str]):
        self.http, self.url, self.admin = http, url, admin

    async def get(self, path: str, **params: str) -> dict:
        async with self.http.get(f"{self.url}{path}", headers=self.admin, params=params) as r:
            return await r.json()

    async def patch(self, changes: dict) -> None:
        async with self.http.patch(f"{self.url}/v2/models/{NAME}", headers=self.admin, json=changes) as r:
            assert r.status == 200, await r.text()

    async def instances(self) -> list[dict]:
        return (await self.get("/v2/instances", model=NAME))["items"]

    async def backend_start(self, instance: str) -> float:
        """Seconds from the instance's Starting event to its Running event (the agent's launch to healthy)."""
        at = await self.event_times(instance)
        return (at["Running"] - at["Starting"]).total_seconds()

    async def event_times(self, name: str) -> dict[str, datetime]:
        """Reason -> when (the newest of each), for an object's events."""
        events = (await self.get("/v2/events", name=name, limit="200"))["items"]
        at: dict[str, datetime] = {}
        for e in events:
            when = datetime.fromisoformat(e["created_at"])
            if e["reason"] not in at or when > at[e["reason"]]:
                at[e["reason"]] = when
        return at


async def wait_for(check, timeout: float = 120.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


async def one_request(http: aiohttp.ClientSession, url: str, key: dict, body: dict) -> tuple[int, float]:
    started = time.perf_counter()
    async with http.post(url, headers=key, json=body) as response:
        await response.read()
        return response.status, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-starts", type=int, default=6)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="maas-autoscale-bench-", dir="/tmp"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--data-dir", str(base / "data"),
                               "--port", str(port), "--database-url", f"sqlite:///{base / 'maas.db'}",
                               "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    cold: list[dict] = []
    load: dict = {}
    try:
        model = write_tiny_gguf(base / "tiny.gguf")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            async def healthy() -> bool:
                try:
                    async with http.get(f"{url}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False
            await wait_for(healthy, what="the server")
            password = (base / "data" / "initial_admin_password").read_text().strip()
            async with http.post(f"{url}/v2/auth/login", json={"username": "admin", "password": password}) as r:
                admin = {"Authorization": f"Bearer {(await r.json())['token']}"}
            async with http.post(f"{url}/v2/keys", json={"name": "bench"}, headers=admin) as r:
                key = {"Authorization": f"Bearer {(await r.json())['key']}"}
            api = Api(http, url, admin)
            async with http.post(f"{url}/v2/models", headers=admin, json={
                    "name": NAME, "source": str(model), "backend": "llama.cpp", "args": ["--parallel", "8"],
                    "replicas": 1, "min_replicas": 0, "max_replicas": 3, "target_concurrency": 8,
                    "scale_down_delay": 3, "idle_timeout": 2, "cold_start_timeout": 120}) as r:
                assert r.status == 201, await r.text()
            chat = f"{url}/v1/chat/completions"
            body = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": args.max_tokens}

            # 1. cold starts
            for n in range(args.cold_starts):
                async def at_zero() -> bool:
                    return not await api.instances() and (await api.get(f"/v2/models/{NAME}"))["replicas"] == 0
                await wait_for(at_zero, what="zero replicas")
                # A model at zero has been idle a while: its controller's per-model pacing (one pass a second,
                # server/reconcile.py) is not what a cold start after an idle spell meets, so it is waited out.
                await asyncio.sleep(1.5)
                stream = n % 2 == 1
                sent = datetime.now(UTC)
                status, latency = await one_request(http, chat, key, {**body, "max_tokens": 2, "stream": stream})
                [instance] = [i for i in await api.instances() if i["state"] == "running"]
                start = await api.backend_start(instance["name"])
                steps = await api.event_times(instance["name"])
                scaled = (await api.event_times(NAME))["ScaledUp"]
                marks = [("request -> ScaledUp", sent, scaled), ("ScaledUp -> Created", scaled, steps["Created"]),
                         ("Created -> Scheduled", steps["Created"], steps["Scheduled"]),
                         ("Scheduled -> Starting", steps["Scheduled"], steps["Starting"]),
                         ("Running -> answered", steps["Running"], sent + timedelta(seconds=latency))]
                cold.append({"stream": stream, "status": status, "latency": latency, "backend_start": start,
                             "overhead": latency - start,
                             "steps": {label: (b - a).total_seconds() for label, a, b in marks}})
                print(f"cold start {n + 1}: {'stream' if stream else 'plain '} HTTP {status} held {latency:.3f} s, "
                      f"backend start {start:.3f} s, overhead {latency - start:.3f} s", flush=True)

            # 2. load step: 4 clients, then 16
            await api.patch({"min_replicas": 1, "idle_timeout": 600})
            await wait_for(lambda: _running(api, 1), what="one running replica")
            stop = asyncio.Event()
            outcomes = {"ok": 0, "failed": 0}
            failures: list[str] = []

            async def client() -> None:
                while not stop.is_set():
                    try:
                        status, _ = await one_request(http, chat, key, body)
                    except aiohttp.ClientError as exc:
                        status, detail = 0, repr(exc)
                    else:
                        detail = f"HTTP {status}"
                    if status == 200:
                        outcomes["ok"] += 1
                    else:
                        outcomes["failed"] += 1
                        failures.append(detail)

            clients = [asyncio.create_task(client()) for _ in range(4)]
            await asyncio.sleep(4)
            low_replicas = (await api.get(f"/v2/models/{NAME}"))["replicas"]
            step = time.monotonic()
            clients += [asyncio.create_task(client()) for _ in range(args.clients - 4)]
            await wait_for(lambda: _running(api, 2, at_least=True), what="a second running replica")
            scale_up = time.monotonic() - step
            newest = max((i for i in await api.instances() if i["state"] == "running"), key=lambda i: i["id"])
            up_start = await api.backend_start(newest["name"])
            peak = (await api.get(f"/v2/models/{NAME}"))["replicas"]
            await asyncio.sleep(3)

            # 3. scale-down under the same load: one replica is enough at a target of 16
            down = time.monotonic()
            await api.patch({"target_concurrency": 16})
            await wait_for(lambda: _count(api, 1), timeout=60, what="back to one instance")
            scale_down = time.monotonic() - down
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*clients)
            reason = (await api.get(f"/v2/models/{NAME}"))["scale_reason"]
            load = {"scale_up": scale_up, "up_start": up_start, "low_replicas": low_replicas, "peak": peak,
                    "scale_down": scale_down, "reason": reason, **outcomes, "failures": failures[:5]}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)

    overheads = sorted(c["overhead"] for c in cold)
    print()
    print(f"tiny llama.cpp model, autoscaled 0-3 at 8 in flight per replica; {len(cold)} cold starts "
          f"(plain and streamed in turn); load step 4 -> {args.clients} clients, max_tokens={args.max_tokens}")
    print(f"{'measure':<44}{'p50':>10}{'max':>10}")
    for label, values in (("cold start: held request latency (s)", [c["latency"] for c in cold]),
                          ("cold start: backend's own start (s)", [c["backend_start"] for c in cold]),
                          ("cold start overhead (s)", overheads)):
        print(f"{label:<44}{statistics.median(values):>10.3f}{max(values):>10.3f}")
    for label in cold[0]["steps"] if cold else ():
        values = [c["steps"][label] for c in cold]
        print(f"{'  overhead step: ' + label + ' (s)':<44}{statistics.median(values):>10.3f}{max(values):>10.3f}")
    print(f"{'non-200 answers to held requests':<44}{sum(c['status'] != 200 for c in cold):>10}")
    print(f"{'replicas at 4 clients / at ' + str(args.clients):<44}{load['low_replicas']:>10}{load['peak']:>10}")
    print(f"{'load step -> 2nd replica running (s)':<44}{load['scale_up']:>10.3f}")
    print(f"{'  of it the backend own start (s)':<44}{load['up_start']:>10.3f}")
    print(f"{'target 16 -> back to one instance (s)':<44}{load['scale_down']:>10.3f}")
    print(f"{'requests ok / failed during steps 2-3':<44}{load['ok']:>10}{load['failed']:>10}")
    print(f"last decision: {load['reason']}")
    if load["failures"]:
        print("failures:", json.dumps(load["failures"]))
    print(f"RESULT cold_start_overhead_s={statistics.median(overheads):.3f} scale_up_s={load['scale_up']:.3f} "
          f"failed={load['failed']} scale_up_minus_backend_start_s={load['scale_up'] - load['up_start']:.3f} "
          f"backend_start_s={statistics.median(c['backend_start'] for c in cold):.3f} ok={load['ok']}")


async def _running(api: Api, count: int, at_least: bool = False) -> bool:
    running = sum(1 for i in await api.instances() if i["state"] == "running")
    return running >= count if at_least else running == count


async def _count(api: Api, count: int) -> bool:
    return len(await api.instances()) == count


if __name__ == "__main__":
    asyncio.run(main())
