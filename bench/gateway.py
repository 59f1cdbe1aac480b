"""The gateway against the same backend hit directly, in one run.

    .venv/bin/python bench/gateway.py [--backend llama|fixed] [--clients 64] [--requests 2000] [--max-tokens 4]

Starts `maas start` (SQLite, local agent) in its own process, deploys one replica of the
backend (llama: the tiny llama.cpp model; fixed: bench/backends/openai_fixed.py, a fast
OpenAI-compatible fixed-answer server registered as a custom backend, for when llama.cpp is
the bottleneck), then drives the backend directly and through `/v1` with the same
concurrent clients, plain and streamed, alternating rounds. Then the same through a model route
(`tiny-canary`: tiny=99, and 1% drawn first to a model with no instance, which falls through to
tiny): what a route adds. Prints a table and, last, `RESULT added_p50_ms=<n> throughput_ratio=<n> ...`
(the first two from the plain requests; `gateway_cpu_us_per_req` and `stream_cpu_us_per_req` are the
gateway's own CPU per plain and streamed request, `route_*` the same through the route, `limits_*` the
same with a key that has every gateway limit set, high enough never to refuse, `limits_route_*` with
both, what the issue's targets are about). The gateway runs of a round take turns going first.
Streamed requests to the gateway keep their connection, as the OpenAI SDKs do; `stream_new_conn_*` is
the gateway's CPU when each stream opens a connection of its own (how this bench measured streams before).
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
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402


def cpu_seconds(process: "psutil.Process | None") -> tuple[float, float]:
    """(user + system, system) CPU seconds of the process so far."""
    if process is None:
        return 0.0, 0.0
    times = process.cpu_times()
    return times.user + times.system, times.system


async def drive(url: str, headers: dict[str, str], body: dict, clients: int, total: int, stream: bool,
                server: "psutil.Process | None" = None, new_connections: bool = False) -> dict:
    """`total` requests from `clients` concurrent connections; latency to the last byte; and the
    server process's CPU time per request (robust to other load on the machine, unlike req/s).
    `new_connections`: a TCP connection per request (llama.cpp drops a stream's keep-alive)."""
    latencies: list[float] = []
    failures = 0
    remaining = total
    payload = json.dumps({**body, "stream": stream}).encode()
    connector = aiohttp.TCPConnector(limit=clients, force_close=new_connections)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
                        if failures <= 3:
                            print(f"  failure: HTTP {response.status} {(await response.text())[:200]}", file=sys.stderr)
                        continue
            except aiohttp.ClientError as exc:
                failures += 1
                if failures <= 3:
                    print(f"  failure: {exc!r}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:
        started, (cpu, system) = time.perf_counter(), cpu_seconds(server)
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        cpu, system = (after - before for after, before in zip(cpu_seconds(server), (cpu, system)))
    latencies.sort()
    return {"ok": len(latencies), "failed": failures, "rps": len(latencies) / elapsed,
            "cpu_us": 1e6 * cpu / max(1, len(latencies) + failures),
            "sys_us": 1e6 * system / max(1, len(latencies) + failures),
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")}


async def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("timed out setting up the benchmark")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", choices=("llama", "fixed"), default="llama")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="maas-gw-bench-", dir="/tmp"))
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(base / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--data-dir", str(base / "data"),
                               "--port", str(port), "--database-url", f"sqlite:///{base / 'maas.db'}",
                               "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        model = write_tiny_gguf(base / "tiny.gguf")
        async with aiohttp.ClientSession() as http:
            async def healthy() -> bool:
                async with http.get(f"{server_url}/healthz") as r:
                    return r.status == 200
            await wait_for(healthy)
            password = (base / "data" / "initial_admin_password").read_text().strip()
            async with http.post(f"{server_url}/v2/auth/login", json={"username": "admin", "password": password}) as r:
                admin = {"Authorization": f"Bearer {(await r.json())['token']}"}
            async with http.post(f"{server_url}/v2/keys", json={"name": "bench"}, headers=admin) as r:
                key = {"Authorization": f"Bearer {(await r.json())['key']}"}
            # The limits run: a key with every limit (server/gateway/limits.py), none of them ever reached.
            async with http.post(f"{server_url}/v2/keys", json={"name": "bench-limited"}, headers=admin) as r:
                limited_key = {"Authorization": f"Bearer {(await r.json())['key']}"}
            async with http.patch(f"{server_url}/v2/keys/bench-limited/limits", headers=admin, json={
                    "rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6, "budget_day": 10**13,
                    "budget_month": 10**14}) as r:
                assert r.status == 200, await r.text()
            deploy = {"name": "tiny", "source": str(model), "backend": "llama.cpp", "replicas": 1,
                      "args": ["--parallel", "8"]}
            if args.backend == "fixed":
                fixed = base / "openai_fixed.py"  # the source must lie under a model root (/tmp is one)
                shutil.copy(ROOT / "bench" / "backends" / "openai_fixed.py", fixed)
                async with http.post(f"{server_url}/v2/backends", headers=admin, json={
                        "name": "openai-fixed", "command": [sys.executable, str(fixed), "--host", "{host}",
                                                           "--port", "{port}"],
                        "health_path": "/health", "metrics_path": None}) as r:
                    assert r.status == 201, await r.text()
                deploy = {"name": "tiny", "source": str(fixed), "backend": "custom:openai-fixed", "replicas": 1,
                          "cpu_only": True, "memory_bytes": 10**8}
            async with http.post(f"{server_url}/v2/models", headers=admin, json=deploy) as r:
                assert r.status == 201, await r.text()

            async def running() -> bool:
                async with http.get(f"{server_url}/v2/instances", headers=admin) as r:
                    items = (await r.json())["items"]
                return bool(items) and items[0]["state"] == "running"
            await wait_for(running)
            async with http.get(f"{server_url}/v2/instances", headers=admin) as r:
                instance = (await r.json())["items"][0]
            # The route run: a canary-shaped route whose 1% share has no running instance.
            async with http.post(f"{server_url}/v2/models", headers=admin,
                                 json={**deploy, "name": "tiny-idle", "replicas": 0}) as r:
                assert r.status == 201, await r.text()
            async with http.post(f"{server_url}/v2/routes", headers=admin, json={
                    "name": "tiny-canary", "targets": [{"model": "tiny", "weight": 99},
                                                       {"model": "tiny-idle", "weight": 1}]}) as r:
                assert r.status == 201, await r.text()
        direct_url = f"http://{instance['address']}:{instance['port']}/v1/chat/completions"
        gateway_url = f"{server_url}/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": args.max_tokens}

        results: dict[tuple[str, str], list[dict]] = {}
        process = psutil.Process(server.pid)  # the MaaS server: gateway, controllers, local agent
        await drive(gateway_url, key, body, args.clients, 200, False)  # warm both paths
        await drive(gateway_url, limited_key, {**body, "model": "tiny-canary"}, args.clients, 200, False)  # its key
        await drive(direct_url, {}, body, args.clients, 200, False)
        for path, url, headers in (("direct", direct_url, {}), ("gateway", gateway_url, key)):
            results[("1 client", path)] = [await drive(url, headers, body, 1, 300, False, process)]
        # Streams straight to llama.cpp need a connection each; to the gateway they keep theirs, as the
        # OpenAI SDKs' pooled clients do ("stream, new conn": a connection per stream, as this bench did
        # until December 2026).
        direct_new = args.backend == "llama"
        for round_ in range(args.rounds):
            results.setdefault(("stream, new conn", "gateway"), []).append(
                await drive(gateway_url, key, body, args.clients, args.requests, True, process, new_connections=True))
            for mode, stream in (("plain", False), ("stream", True)):
                routed = {**body, "model": "tiny-canary"}
                runs = [("gateway", key, body), ("limits", limited_key, body), ("route", key, routed),
                        ("both", limited_key, routed)]  # both: limits and a route, what every request pays from now on
                # Each round starts with another of them: the machine's drift does not favour one.
                runs = runs[round_ % len(runs):] + runs[:round_ % len(runs)]
                results.setdefault((mode, "direct"), []).append(
                    await drive(direct_url, {}, body, args.clients, args.requests, stream, process,
                                new_connections=stream and direct_new))
                for path, headers, payload in runs:
                    results.setdefault((mode, path), []).append(
                        await drive(gateway_url, headers, payload, args.clients, args.requests, stream, process))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)

    def merged(mode: str, path: str) -> dict:
        runs = results[(mode, path)]
        return {"rps": statistics.mean(r["rps"] for r in runs), "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "cpu_us": statistics.mean(r["cpu_us"] for r in runs),
                "sys_us": statistics.mean(r["sys_us"] for r in runs),
                "p99_ms": max(r["p99_ms"] for r in runs), "failed": sum(r["failed"] for r in runs),
                "ok": sum(r["ok"] for r in runs)}

    print(f"{args.clients} concurrent clients, {args.requests} requests a run, {args.rounds} rounds, "
          f"max_tokens={args.max_tokens}, one replica of "
          f"{'llama.cpp (tiny model)' if args.backend == 'llama' else 'bench/backends/openai_fixed.py'}")
    print(f"plain and stream: {args.clients} clients; '1 client': unloaded, plain")
    print("server cpu us/req: CPU time of the MaaS server process per request (direct: its idle background)")
    print(f"{'mode':<10}{'path':<9}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'ok':>8}{'failed':>8}{'cpu us/req':>12}{'of it sys':>10}")
    summary = {}
    for mode in ("1 client", "plain", "stream"):
        for path in ("direct", "gateway"):
            m = merged(mode, path)
            summary[(mode, path)] = m
            print(f"{mode:<10}{path:<9}{m['rps']:>10.0f}{m['p50_ms']:>10.2f}{m['p99_ms']:>10.2f}{m['ok']:>8}"
                  f"{m['failed']:>8}{m['cpu_us']:>12.0f}{m['sys_us']:>10.0f}")
    m = summary[("stream, new conn", "gateway")] = merged("stream, new conn", "gateway")
    print(f"{'stream':<10}{'new conn':<9}{m['rps']:>10.0f}{m['p50_ms']:>10.2f}{m['p99_ms']:>10.2f}{m['ok']:>8}"
          f"{m['failed']:>8}{m['cpu_us']:>12.0f}{m['sys_us']:>10.0f}")
    for mode in ("plain", "stream"):
        for path in ("route", "limits", "both"):
            m = summary[(mode, path)] = merged(mode, path)
            print(f"{mode:<10}{path:<9}{m['rps']:>10.0f}{m['p50_ms']:>10.2f}{m['p99_ms']:>10.2f}{m['ok']:>8}"
                  f"{m['failed']:>8}{m['cpu_us']:>12.0f}{m['sys_us']:>10.0f}")
    for mode in ("1 client", "plain", "stream"):
        d, g = summary[(mode, "direct")], summary[(mode, "gateway")]
        print(f"{mode}: added p50 {g['p50_ms'] - d['p50_ms']:.2f} ms, throughput ratio {g['rps'] / d['rps']:.2f}, "
              f"gateway CPU {g['cpu_us'] - d['cpu_us']:.0f} us/req")
    n_c = summary[("stream, new conn", "gateway")]
    print(f"stream, a new connection per request: gateway CPU {n_c['cpu_us'] - summary[('stream', 'direct')]['cpu_us']:.0f} "
          f"us/req ({n_c['cpu_us'] - summary[('stream', 'gateway')]['cpu_us']:+.0f} us against keeping it)")
    for mode in ("plain", "stream"):
        d, r = summary[(mode, "direct")], summary[(mode, "route")]
        print(f"{mode} through a route: gateway CPU {r['cpu_us'] - d['cpu_us']:.0f} us/req "
              f"({r['cpu_us'] - summary[(mode, 'gateway')]['cpu_us']:+.0f} us against the model's own name)")
    for mode in ("plain", "stream"):
        d, m = summary[(mode, "direct")], summary[(mode, "limits")]
        print(f"{mode} with limits: gateway CPU {m['cpu_us'] - d['cpu_us']:.0f} us/req "
              f"({m['cpu_us'] - summary[(mode, 'gateway')]['cpu_us']:+.0f} us against a key without limits)")
    for mode in ("plain", "stream"):
        d, m = summary[(mode, "direct")], summary[(mode, "both")]
        print(f"{mode} with limits and a route: gateway CPU {m['cpu_us'] - d['cpu_us']:.0f} us/req "
              f"({m['cpu_us'] - summary[(mode, 'gateway')]['cpu_us']:+.0f} us against neither)")
    r_p, r_s = summary[("plain", "route")], summary[("stream", "route")]
    l_p, l_s = summary[("plain", "limits")], summary[("stream", "limits")]
    b_p, b_s = summary[("plain", "both")], summary[("stream", "both")]
    d, g = summary[("plain", "direct")], summary[("plain", "gateway")]
    s_d, s_g = summary[("stream", "direct")], summary[("stream", "gateway")]
    u_d, u_g = summary[("1 client", "direct")], summary[("1 client", "gateway")]
    print(f"RESULT added_p50_ms={g['p50_ms'] - d['p50_ms']:.2f} throughput_ratio={g['rps'] / d['rps']:.2f} "
          f"unloaded_added_p50_ms={u_g['p50_ms'] - u_d['p50_ms']:.2f} "
          f"stream_added_p50_ms={s_g['p50_ms'] - s_d['p50_ms']:.2f} stream_throughput_ratio={s_g['rps'] / s_d['rps']:.2f} "
          f"gateway_cpu_us_per_req={g['cpu_us'] - d['cpu_us']:.0f} stream_cpu_us_per_req={s_g['cpu_us'] - s_d['cpu_us']:.0f} "
          f"route_cpu_us_per_req={r_p['cpu_us'] - d['cpu_us']:.0f} "
          f"route_stream_cpu_us_per_req={r_s['cpu_us'] - s_d['cpu_us']:.0f} "
          f"limits_cpu_us_per_req={l_p['cpu_us'] - d['cpu_us']:.0f} "
          f"limits_stream_cpu_us_per_req={l_s['cpu_us'] - s_d['cpu_us']:.0f} "
          f"limits_route_cpu_us_per_req={b_p['cpu_us'] - d['cpu_us']:.0f} "
          f"limits_route_stream_cpu_us_per_req={b_s['cpu_us'] - s_d['cpu_us']:.0f} "
          f"stream_new_conn_cpu_us_per_req={n_c['cpu_us'] - s_d['cpu_us']:.0f}")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
