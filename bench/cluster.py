"""The control plane at scale: a real server and a simulated cluster, as separate processes.

    .venv/bin/python bench/cluster.py [--workers 1000] [--gpus 8xH100-80GB] [--replicas 500] [--steady 60]
                                      [--watchers 20] [--heartbeat 5]

`maas start --no-agent` (embedded PostgreSQL) and `maas simulate` run as their own processes; this
process holds the TUI-style watchers (every kind) and measures. Timeline: the server starts, the
simulated workers register (each with its own watch of its instances), the watchers connect, a
model with `--replicas` replicas is deployed and timed until every replica is running, then a
steady window of `--steady` seconds in which the server's and PostgreSQL's CPU are measured.

Printed: server CPU (own process) and PostgreSQL CPU in the steady window, heartbeat p50/p99 (all
and steady window), errors (simulated agents' failed calls other than 429/503 back-offs, watcher
failures), busy answers, workers ever seen not_ready, seconds to place and run all replicas, watcher
lag p99 (an instance change's updated_at, stamped when its transaction flushes, to the arrival of the
bytes that complete its line at a watcher; the lag after this process has also parsed it is shown too),
server RSS; the last line is `RESULT workers=... server_cpu_pct=... hb_p99_ms=... not_ready=...
errors=... place_s=... watch_lag_p99_ms=... rss_mb=...`. Note: the machine running this also runs
the load generator (and possibly more), so the figures are upper bounds for the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import free_port  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

from server.ndjson import json_lines, watch_messages  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def postgres_cpu_seconds(data_dir: Path) -> float:
    """CPU of the embedded PostgreSQL: the postmaster with its reaped children (backends come and go)
    and the live ones."""
    pids = postgres_pids(data_dir)
    if not pids:
        return 0.0
    try:
        fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / TICK  # cutime, cstime
    except OSError:
        reaped = 0.0
    return reaped + sum(cpu_seconds(p) for p in pids)


def postgres_pids(data_dir: Path) -> list[int]:
    """The embedded PostgreSQL's postmaster (its -D lies under data_dir) and its children."""
    pids: dict[int, int] = {}
    master = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid, ppid = int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])
        pids[pid] = ppid
        if "postgres" in cmdline and str(data_dir) in cmdline and " -D " in f" {cmdline}":
            master = pid
    if master is None:
        return []
    return [master] + [pid for pid, ppid in pids.items() if ppid == master]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Watchers:
    """TUI-style watchers of everything: what they saw and how late."""

    def __init__(self, url: str, token: str, count: int):
        self.url, self.token, self.count = url, token, count
        self.lags: list[float] = []  # commit -> the line's bytes arriving here
        self.parsed_lags: list[float] = []  # commit -> the line parsed by this process (20 watchers share it)
        self.lags_by_state: dict[str, list[float]] = {}  # by the state the instance changed to
        self.not_ready: set[int] = set()
        self.errors = 0
        self.frames = 0
        self.running: dict[int, set[int]] = {}  # model id -> running instance ids (first watcher)
        self.placed: dict[int, set[int]] = {}  # model id -> instance ids with a worker (first watcher)
        self.workers: set[int] = set()  # worker ids seen (first watcher)
        self.tasks: list[asyncio.Task[None]] = []
        self.measuring = True

    async def one(self, http: aiohttp.ClientSession, index: int) -> None:
        version = None
        while True:
            params = {"kinds": "workers,models,instances,events"} | ({"since": str(version)} if version else {})
            try:
                async with http.get(f"{self.url}/v2/watch", params=params,
                                    headers={"Authorization": f"Bearer {self.token}"},
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as response:
                    response.raise_for_status()
                    arrived = [0.0]

                    async def chunks() -> Any:
                        async for chunk in response.content.iter_any():
                            arrived[0] = time.time()
                            yield chunk

                    async def lines() -> Any:
                        # One process stands in for 20 TUIs: lines this measurement does not use (the
                        # event log, telemetry frames) are counted, not parsed, or the parsing of every
                        # watcher's lines would be counted in the lag of the next.
                        async for line in json_lines(chunks()):
                            head = line[:80]
                            if head.startswith(b'{"type":"event"') and (b'"kind":"events"' in head
                                                                       or b'"kind":"telemetry"' in head):
                                self.frames += index == 0 and b'"kind":"telemetry"' in head
                                continue
                            yield line + b"\n"

                    async for message in watch_messages(lines()):
                        # A line is received with the chunk that completes it (the one read last): its
                        # arrival, not after this process parsed the lines of the 19 other watchers too.
                        received, parsed = arrived[0], time.time()
                        version = message["version"]
                        if message["type"] == "snapshot":
                            for worker in message["items"].get("workers", ()):
                                if index == 0:
                                    self.workers.add(worker["id"])
                                if worker["state"] != "ready":
                                    self.not_ready.add(worker["id"])
                            continue
                        if message["type"] != "event":
                            continue
                        kind, obj = message["kind"], message["object"]
                        if kind == "workers" and index == 0:
                            (self.workers.discard if message["action"] == "deleted" else self.workers.add)(obj["id"])
                        if kind == "workers" and obj["state"] != "ready":
                            self.not_ready.add(obj["id"])
                        if kind == "instances" and message["action"] != "deleted":
                            if self.measuring:
                                stamp = datetime.fromisoformat(obj["updated_at"]).timestamp()
                                self.lags.append(received - stamp)
                                self.parsed_lags.append(parsed - stamp)
                                self.lags_by_state.setdefault(obj["state"], []).append(received - stamp)
                            if index == 0:
                                ids = self.running.setdefault(obj["model_id"], set())
                                (ids.add if obj["state"] == "running" else ids.discard)(obj["id"])
                                ids = self.placed.setdefault(obj["model_id"], set())
                                (ids.add if obj["worker_id"] is not None else ids.discard)(obj["id"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                print(f"watcher {index}: {type(exc).__name__}: {exc}", flush=True)
                await asyncio.sleep(1)

    def start(self, http: aiohttp.ClientSession) -> None:
        self.tasks = [asyncio.create_task(self.one(http, i)) for i in range(self.count)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout:.0f} s")


def print_table(rows: list[tuple[str, str]]) -> None:
    """A bench's figures: one `label  value` line each, the values aligned."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


class LocalServer(NamedTuple):
    base: Path  # the temporary folder: data, logs (server.log), the CLI's config; the caller removes it
    data_dir: Path  # the server's --data-dir (token, initial_admin_password, the embedded PostgreSQL)
    model: Path | None  # the tiny GGUF, in a folder allowed as a model root; None without tiny_model
    url: str
    env: dict[str, str]  # the server's environment, for the processes started beside it (maas simulate)
    process: subprocess.Popen


def start_server(prefix: str, tiny_model: bool = True, options: tuple[str, ...] = ()) -> LocalServer:
    """`maas start --no-agent` as its own process (embedded PostgreSQL unless `options` name another
    store) in a new temporary folder, on a free port of 127.0.0.1, optionally with the tiny model from
    tests/tiny_gguf.py to deploy. The caller waits for it (wait_http) and stops it (stop_processes).
    bench/heartbeat.py and scripts/simulated_screenshot.py start theirs here too."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)  # the embedded PostgreSQL runs as another user when we are root
    data_dir = base / "data"
    env = {**os.environ, "MAAS_CONFIG": str(base / "cli.json"), "PYTHONUNBUFFERED": "1"}
    model = None
    if tiny_model:
        model = base / "models" / "tiny.gguf"
        model.parent.mkdir()
        write_tiny_gguf(model, seed=0)
        env["MAAS_MODEL_ROOTS"] = str(model.parent)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--no-agent", "--data-dir", str(data_dir),
                                "--port", str(port), *options], stdout=open(base / "server.log", "wb"),
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return LocalServer(base, data_dir, model, f"http://127.0.0.1:{port}", env, process)


def stop_processes(simulate: subprocess.Popen | None, server: subprocess.Popen) -> None:
    """Stops `maas simulate` (SIGINT: it writes its summary) and then the server (SIGTERM), each given
    a minute before its process group is killed. scripts/simulated_screenshot.py stops its pair here too."""
    for process, sig in ((simulate, signal.SIGINT), (server, signal.SIGTERM)):
        if process is None or process.poll() is not None:
            continue
        process.send_signal(sig)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


async def main(args: argparse.Namespace) -> None:
    base, data_dir, model, url, env, server = start_server("maas-bench-cluster-")
    simulate = None
    summary_path = base / "simulate.json"
    try:
        await wait_http(url, 120)
        token = (data_dir / "token").read_text().strip()
        password = (data_dir / "initial_admin_password").read_text().strip()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async with http.post(f"{url}/v2/auth/login", json={"username": "admin", "password": password}) as r:
                admin = (await r.json())["token"]
            auth = {"Authorization": f"Bearer {admin}"}
            watchers = Watchers(url, admin, args.watchers)
            watchers.start(http)

            started = time.monotonic()
            simulate = subprocess.Popen(
                [sys.executable, "-m", "maas_tui", "simulate", "--server", url, "--token", token,
                 "--workers", str(args.workers), "--gpus", args.gpus, "--heartbeat-interval", str(args.heartbeat),
                 "--report-every", "20", "--summary", str(summary_path), "--register-rate", str(args.register_rate)],
                stdout=open(base / "simulate.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

            while (registered := len(watchers.workers)) < args.workers:  # no listing: it would load the server
                if time.monotonic() - started > 300 or simulate.poll() is not None:
                    raise RuntimeError(f"only {registered} of {args.workers} workers registered")
                await asyncio.sleep(2)
            registered_s = time.monotonic() - started
            # The measuring process's own collections would count as watcher lag: its state so far is
            # frozen and the collector stays off until the end (a few minutes of garbage, freed by refcounts).
            gc.collect()
            gc.freeze()
            gc.disable()
            registration_cpu = 100 * cpu_seconds(server.pid) / registered_s  # from its start: an upper bound
            print(f"{args.workers} workers registered in {registered_s:.1f} s "
                  f"(server CPU {registration_cpu:.0f} % of a core meanwhile)", flush=True)
            await asyncio.sleep(10)  # every watch connected, heartbeats spread

            deploy_at = time.monotonic()
            body = {"name": "bench", "source": str(model), "backend": "llama.cpp", "replicas": args.replicas}
            async with http.post(f"{url}/v2/models", json=body, headers=auth) as r:
                created = await r.json()
                if r.status >= 300:
                    raise RuntimeError(f"deploy refused: {created}")
            model_id = created["id"]
            place_s = running_s = None
            while time.monotonic() - deploy_at < 180:
                if place_s is None and len(watchers.placed.get(model_id, ())) >= args.replicas:
                    place_s = time.monotonic() - deploy_at
                if len(watchers.running.get(model_id, ())) >= args.replicas:
                    running_s = time.monotonic() - deploy_at
                    break
                await asyncio.sleep(0.05)
            print(f"{args.replicas} replicas placed after {place_s if place_s is None else round(place_s, 2)} s, "
                  f"running after {running_s if running_s is None else round(running_s, 2)} s", flush=True)

            await asyncio.sleep(5)  # the deploy's tail (events, reports) out of the window
            pg = postgres_pids(data_dir)
            server_cpu0, pg_cpu0 = cpu_seconds(server.pid), postgres_cpu_seconds(data_dir)
            sim_cpu0, bench_cpu0 = cpu_seconds(simulate.pid), time.process_time()
            window_start = time.monotonic()
            rss = 0.0
            while time.monotonic() - window_start < args.steady:
                await asyncio.sleep(1)
                rss = max(rss, rss_mb(server.pid))
            window = time.monotonic() - window_start
            server_cpu = 100 * (cpu_seconds(server.pid) - server_cpu0) / window
            pg_cpu = 100 * (postgres_cpu_seconds(data_dir) - pg_cpu0) / window
            sim_cpu = 100 * (cpu_seconds(simulate.pid) - sim_cpu0) / window
            bench_cpu = 100 * (time.process_time() - bench_cpu0) / window
            load = os.getloadavg()[0]
            steady_to = window_start + window
            watchers.measuring = False
            await watchers.stop()
    finally:
        stop_processes(simulate, server)

    summary = json.loads(summary_path.read_text())
    # Sample times are seconds from the simulator's start on CLOCK_MONOTONIC, which both processes share.
    samples = [(summary["started_monotonic"] + t, d) for t, d in summary["heartbeat_samples"]]
    all_ms = [d for _, d in samples]
    steady_ms = [d for t, d in samples if window_start <= t <= steady_to]
    hb_p50, hb_p99 = percentile(steady_ms or all_ms, 0.5), percentile(steady_ms or all_ms, 0.99)
    errors = summary["errors"] + watchers.errors
    lag_p99 = percentile(watchers.lags, 0.99) * 1000
    rows = [
        ("workers x GPUs", f"{args.workers} x {args.gpus} (simulated)"),
        ("registration", f"{registered_s:.1f} s"),
        ("server CPU, steady window", f"{server_cpu:.1f} % of a core"),
        ("PostgreSQL CPU, steady window", f"{pg_cpu:.1f} % of a core ({len(pg)} processes)"),
        ("load: maas simulate / watchers CPU", f"{sim_cpu:.0f} % / {bench_cpu:.0f} % of a core; load average {load:.1f} "
                                              f"on {os.cpu_count()} cores"),
        ("heartbeat p50 / p99, steady", f"{hb_p50:.1f} / {hb_p99:.1f} ms ({len(steady_ms)} heartbeats)"),
        ("heartbeat p50 / p99, whole run", f"{percentile(all_ms, 0.5):.1f} / {percentile(all_ms, 0.99):.1f} ms "
                                           f"({len(all_ms)} heartbeats)"),
        ("load generator's event loop lag p99", f"{summary['loop_lag_p99_ms']:.0f} ms (included in its heartbeat latencies)"),
        ("errors", f"{errors} {summary['error_kinds'] or ''} (watchers: {watchers.errors})"),
        ("busy answers (429/503, backed off)", str(summary["busy"])),
        ("workers ever seen not_ready", str(len(watchers.not_ready))),
        (f"{args.replicas} replicas placed (on a worker)", f"{place_s:.2f} s" if place_s is not None else "not within 180 s"),
        (f"{args.replicas} replicas running (reported)", f"{running_s:.2f} s" if running_s is not None else "not within 180 s"),
        ("watcher lag p50 / p99", f"{percentile(watchers.lags, 0.5) * 1000:.0f} / {lag_p99:.0f} ms "
                                  f"({len(watchers.lags)} lines, {args.watchers} watchers)"),
        ("watcher lag p50 / p99, line parsed here", f"{percentile(watchers.parsed_lags, 0.5) * 1000:.0f} / "
                                                    f"{percentile(watchers.parsed_lags, 0.99) * 1000:.0f} ms "
                                                    "(after this process parsed every watcher's lines before it)"),
        ("watcher lag p99 by new state", ", ".join(f"{state} {percentile(lags, 0.99) * 1000:.0f} ms"
                                                   for state, lags in sorted(watchers.lags_by_state.items()))),
        ("telemetry frames (one watcher)", str(watchers.frames)),
        ("server RSS (max, steady window)", f"{rss:.0f} MB"),
    ]
    print_table(rows)
    print(f"(logs in {base})")
    print(f"RESULT workers={args.workers} server_cpu_pct={server_cpu:.1f} pg_cpu_pct={pg_cpu:.1f} "
          f"hb_p50_ms={hb_p50:.1f} hb_p99_ms={hb_p99:.1f} not_ready={len(watchers.not_ready)} errors={errors} "
          f"place_s={place_s if place_s is None else round(place_s, 2)} "
          f"running_s={running_s if running_s is None else round(running_s, 2)} watch_lag_p99_ms={lag_p99:.0f} rss_mb={rss:.0f}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--gpus", default="8xH100-80GB")
    parser.add_argument("--replicas", type=int, default=500)
    parser.add_argument("--steady", type=float, default=60.0)
    parser.add_argument("--watchers", type=int, default=20)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--register-rate", type=float, default=50.0, help="registrations started per second")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data folder")
    try:
        import uvloop  # as the server and `maas simulate` run: the watchers' own loop is part of the lag measured
    except ImportError:
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
