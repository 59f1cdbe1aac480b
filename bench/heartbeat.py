"""What one heartbeat costs the server: a report that repeats the worker's last one byte for byte (an idle
worker: the server skips parsing and validation) against one whose readings moved (validated in full).

    .venv/bin/python bench/heartbeat.py [--workers 50] [--heartbeats 3000] [--rounds 2] [--gpus 8]

`maas start --no-agent` (embedded PostgreSQL, or `--database-url sqlite:///...`) runs as its own process;
this process registers `--workers` workers with the cluster token and sends, in alternating rounds, a phase
of `--heartbeats` changed reports and a phase of as many repeated ones (one sender per worker, each
waiting for its answer). The server's own CPU is read from /proc before and after each phase; its
background work (telemetry frames, liveness ticks, flushes), measured in an idle phase of the same
length, is taken out. The last line is `RESULT workers=... same_us=... changed_us=... saved_pct=...`
(server CPU per heartbeat, in microseconds). The load generator shares the machine, so the figures
are for comparison with each other, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from cluster import cpu_seconds, print_table, start_server, stop_processes, wait_http  # noqa: E402


def report(worker: int, gpus: int, moved: int) -> bytes:
    """A simulated worker's heartbeat; `moved` changes its readings (0: the idle worker's fixed report)."""
    devices = [{"index": i, "name": "H100-80GB (simulated)", "vendor": "nvidia", "uuid": f"SIM-{worker}-{i}",
                "memory_total": 80 << 30, "memory_used": (1 << 30) + moved, "utilization": round(moved % 1000 / 10, 1),
                "temperature": 33.0, "power_watts": 70.0, "mig_mode": None, "processes": [], "simulated": True}
               for i in range(gpus)]
    host = {"hostname": f"bench-{worker}", "os": "Linux (simulated)", "cpu_count": 64, "cpu_percent": 3.0,
            "memory_total": 512 << 30, "memory_used": 48 << 30}
    return json.dumps({"gpus": devices, "host": host}).encode()


async def phase(http: aiohttp.ClientSession, url: str, tokens: list[str], gpus: int, count: int,
                changed: bool) -> tuple[int, float]:
    """`count` heartbeats spread over the workers; returns (errors, seconds)."""
    per_worker = count // len(tokens)
    errors = 0

    async def sender(index: int, token: str) -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for n in range(per_worker):
            body = report(index, gpus, time.monotonic_ns() if changed else 0)
            async with http.post(f"{url}/v2/agent/heartbeat", data=body, headers=headers) as response:
                await response.read()
                errors += response.status != 200

    started = time.monotonic()
    await asyncio.gather(*(sender(i, t) for i, t in enumerate(tokens)))
    return errors, time.monotonic() - started


async def main(args: argparse.Namespace) -> None:
    options = ("--database-url", args.database_url) if args.database_url else ()
    base, data_dir, _, url, _, server = start_server("maas-bench-heartbeat-", tiny_model=False, options=options)
    cpu_us: dict[str, list[float]] = {"changed": [], "same": []}
    errors = 0
    try:
        await wait_http(url, 120)
        cluster_token = (data_dir / "token").read_text().strip()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            tokens = []
            for index in range(args.workers):
                body = {"name": f"bench-{index}", "address": "127.0.0.1", "agent_port": 9}
                body |= json.loads(report(index, args.gpus, 0))
                async with http.post(f"{url}/v2/agent/register", json=body,
                                     headers={"Authorization": f"Bearer {cluster_token}"}) as r:
                    if r.status != 201:
                        raise RuntimeError(f"registration refused: {await r.text()}")
                    tokens.append((await r.json())["token"])
            await phase(http, url, tokens, args.gpus, args.workers * 4, changed=True)  # warm up both paths
            await phase(http, url, tokens, args.gpus, args.workers * 4, changed=False)
            idle_before = cpu_seconds(server.pid)
            await asyncio.sleep(5)
            idle_rate = (cpu_seconds(server.pid) - idle_before) / 5  # background CPU seconds per second
            sent = (args.heartbeats // args.workers) * args.workers
            for _ in range(args.rounds):
                for kind in ("changed", "same"):
                    before = cpu_seconds(server.pid)
                    failed, seconds = await phase(http, url, tokens, args.gpus, sent, changed=kind == "changed")
                    errors += failed
                    used = cpu_seconds(server.pid) - before - idle_rate * seconds
                    cpu_us[kind].append(1e6 * used / sent)
    finally:
        stop_processes(None, server)
    same, changed = min(cpu_us["same"]), min(cpu_us["changed"])  # the least disturbed round of each
    rows = [
        ("workers x GPUs", f"{args.workers} x {args.gpus} (simulated)"),
        ("heartbeats per phase", f"{sent} ({args.rounds} rounds of each kind)"),
        ("server background CPU (idle)", f"{100 * idle_rate:.1f} % of a core (taken out below)"),
        ("server CPU per changed heartbeat", f"{changed:.0f} us (rounds: {', '.join(f'{v:.0f}' for v in cpu_us['changed'])})"),
        ("server CPU per repeated heartbeat", f"{same:.0f} us (rounds: {', '.join(f'{v:.0f}' for v in cpu_us['same'])})"),
        ("errors", str(errors)),
    ]
    print_table(rows)
    print(f"RESULT workers={args.workers} gpus={args.gpus} heartbeats={sent} same_us={same:.0f} changed_us={changed:.0f} "
          f"saved_pct={100 * (changed - same) / changed:.0f} errors={errors}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--heartbeats", type=int, default=3000, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--database-url", default="", help="e.g. sqlite:///PATH (default: embedded PostgreSQL)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data folder")
    asyncio.run(main(parser.parse_args()))
