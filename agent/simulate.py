"""`maas simulate`: many fake agents in one process, speaking the real agent protocol.

For demos, capacity planning and scale tests (as KWOK is for Kubernetes). Each simulated worker
registers with the cluster token, holds its own `/v2/watch?kinds=instances` stream, heartbeats with
GPUs whose utilisation moves, and reports the instances placed on it `running` at once: no backend
process runs anywhere. Everything is labelled simulated: GPUs carry `simulated: true` (and
"(simulated)" in their name), workers the label `maas.simulated=true`.

Failures on request: `kill_rate` workers a minute stop (heartbeats and watch end, as a killed
agent's would); with `flap` they come back after `flap_down` seconds, as a host that lost its
network does. Every answer is counted: heartbeat latencies, busy answers (429/503 with
Retry-After, which are backed off as the agent does) and errors (anything else that failed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent import backoff
from agent.devices import parse_simulated
from server.ndjson import watch_messages

log = logging.getLogger(__name__)

SIMULATED_LABEL = "maas.simulated"


@dataclass
class SimulateConfig:
    server_url: str
    token: str
    workers: int = 10
    gpus: str = "8xH100-80GB"
    heartbeat_interval: float = 5.0
    kill_rate: float = 0.0  # workers stopped per minute
    flap: bool = False  # stopped workers come back after flap_down seconds
    flap_down: float = 30.0
    name_prefix: str = "sim"
    register_rate: float = 50.0  # registrations started per second (a whole rack does not boot at once)
    request_timeout: float = 10.0


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    registered: int = 0
    heartbeats: list[tuple[float, float]] = field(default_factory=list)  # (monotonic time, seconds)
    errors: dict[str, int] = field(default_factory=dict)  # what failed -> count
    busy: int = 0  # 429/503 answers with Retry-After, backed off
    reports: int = 0  # instance states reported
    killed: int = 0
    revived: int = 0
    # How late this process's own event loop runs (a 100 ms timer's overshoot): a heartbeat's measured
    # latency includes it, so a busy load generator shows here, not as a slow server.
    loop_lags: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def heartbeat_percentiles(self, since: float = 0.0) -> tuple[float, float, int]:
        """(p50, p99) in milliseconds of heartbeats sent after `since`, and their count."""
        values = sorted(d for t, d in self.heartbeats if t >= since)
        if not values:
            return 0.0, 0.0, 0
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
        return pick(0.5), pick(0.99), len(values)

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        p50, p99, count = self.heartbeat_percentiles(since)
        lags = sorted(self.loop_lags)
        loop_p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1000 if lags else 0.0
        return {"registered": self.registered, "heartbeats": count, "hb_p50_ms": round(p50, 1),
                "loop_lag_p99_ms": round(loop_p99, 1),
                "hb_p99_ms": round(p99, 1), "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
                "busy": self.busy, "reports": self.reports, "killed": self.killed, "revived": self.revived}


class SimulatedWorker:
    def __init__(self, cluster: "SimulatedCluster", index: int):
        self.cluster = cluster
        self.name = f"{cluster.config.name_prefix}-{index:05d}"
        self.gpus = [g.model_dump(mode="json") for g in parse_simulated(cluster.config.gpus)]
        for gpu in self.gpus:  # not the host's name: every simulated worker has GPUs of its own
            gpu["uuid"] = f"SIM-{self.name}-{gpu['index']}"
        self.phase = [random.uniform(0, 2 * math.pi) for _ in self.gpus]
        self.worker_id: int | None = None
        self.token = ""
        self.instances: dict[int, dict[str, Any]] = {}  # placed here, by id
        self.reported: dict[int, tuple[str, Any]] = {}  # instance id -> (state, updated_at) acted on
        self.alive = True
        self.tasks: list[asyncio.Task[None]] = []

    # --- what it reports ------------------------------------------------------------

    def readings(self) -> dict[str, Any]:
        """GPUs whose utilisation moves: a slow wave per GPU plus noise, higher where an instance runs."""
        now = time.monotonic()
        claimed: dict[int, int] = {}
        for instance in self.instances.values():
            claim = instance.get("claim") or {}
            if instance.get("state") == "running":
                for index in claim.get("gpu_indexes") or ():
                    claimed[index] = claimed.get(index, 0) + int(claim.get("vram_bytes_per_gpu") or 0)
        gpus = []
        for gpu, phase in zip(self.gpus, self.phase):
            busy = gpu["index"] in claimed
            wave = (math.sin(now / 60 + phase) + 1) / 2
            utilization = (55 + 40 * wave if busy else 8 * wave) + random.uniform(-3, 3)
            used = claimed.get(gpu["index"], 0) or int(gpu["memory_total"] * 0.01)
            gpus.append(gpu | {"utilization": round(min(100.0, max(0.0, utilization)), 1),
                               "memory_used": min(used, gpu["memory_total"]),
                               "temperature": round(30 + utilization * 0.5, 1), "power_watts": round(70 + utilization * 6)})
        host = {"hostname": self.name, "os": "Linux (simulated)", "cpu_count": 64,
                "cpu_percent": round(random.uniform(2, 12), 1), "memory_total": 512 << 30,
                "memory_used": (48 << 30) + random.randint(0, 8 << 30)}
        return {"gpus": gpus, "host": host}

    # --- protocol -------------------------------------------------------------------

    async def register(self) -> None:
        config = self.cluster.config
        body = {"name": self.name, "address": "127.0.0.1", "agent_port": 9,  # discard: nothing serves here
                "labels": {SIMULATED_LABEL: "true"}} | self.readings()
        attempt = 0
        while True:
            headers = None
            if self.token:  # registering again (its token was refused): the current one keeps the name
                body["token"] = self.token
            try:
                async with self.cluster.http.post(f"{config.server_url}/v2/agent/register", json=body,
                                                  headers={"Authorization": f"Bearer {config.token}"}) as response:
                    if response.status == 201:
                        registered = await response.json()
                        self.worker_id = registered["worker"]["id"]
                        self.token = registered["token"]
                        self.cluster.stats.registered += 1
                        return
                    if response.status in (401, 403, 422):
                        raise RuntimeError(f"registration refused ({response.status}): {await response.text()}")
                    if response.status in backoff.BUSY:
                        self.cluster.stats.busy += 1
                        headers = response.headers
                    else:
                        self.cluster.stats.error(f"register {response.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.cluster.stats.error(f"register {type(exc).__name__}")
            await asyncio.sleep(backoff.delay(attempt, headers))
            attempt += 1

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def heartbeat_loop(self) -> None:
        config = self.cluster.config
        # Spread over the interval: workers started together do not beat together.
        await asyncio.sleep(random.uniform(0, config.heartbeat_interval))
        while True:
            body = self.readings()  # before the clock starts: the latency is the server's and the network's
            started = time.monotonic()
            wait = config.heartbeat_interval
            try:
                async with self.cluster.http.post(f"{config.server_url}/v2/agent/heartbeat", json=body,
                                                  headers=self._auth()) as response:
                    await response.read()
                    if response.status == 200:
                        self.cluster.stats.heartbeats.append((started, time.monotonic() - started))
                    elif response.status in backoff.BUSY:
                        self.cluster.stats.busy += 1
                        wait = min(wait, backoff.delay(0, response.headers))
                    elif response.status in (401, 404):
                        self.cluster.stats.error(f"heartbeat {response.status}")
                        await self.register()
                    else:
                        self.cluster.stats.error(f"heartbeat {response.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.cluster.stats.error(f"heartbeat {type(exc).__name__}")
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))

    async def watch_loop(self) -> None:
        config = self.cluster.config
        version: int | None = None
        attempt = 0
        while True:
            params = {"kinds": "instances"} | ({"since": str(version)} if version is not None else {})
            headers = None
            try:
                async with self.cluster.http.get(f"{config.server_url}/v2/watch", params=params, headers=self._auth(),
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as response:
                    if response.status in backoff.BUSY:
                        self.cluster.stats.busy += 1
                        headers = response.headers
                    elif response.status != 200:
                        self.cluster.stats.error(f"watch {response.status}")
                        if response.status == 401:
                            await self.register()
                            version = None
                    else:
                        async for message in watch_messages(response.content.iter_any()):
                            version = message["version"]
                            attempt = 0
                            self._apply(message)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("%s: watch ended (%s)", self.name, exc)
            await asyncio.sleep(backoff.delay(attempt, headers))
            attempt += 1

    def _apply(self, message: dict[str, Any]) -> None:
        if message["type"] == "snapshot":
            self.instances = {i["id"]: i for i in message["items"].get("instances", ())
                              if i.get("worker_id") == self.worker_id}
        elif message["type"] == "event" and message.get("kind") == "instances":
            instance = message["object"]
            if message["action"] == "deleted" or instance.get("worker_id") != self.worker_id:
                self.instances.pop(instance["id"], None)
                self.reported.pop(instance["id"], None)
            else:
                self.instances[instance["id"]] = instance
        else:
            return
        for instance in list(self.instances.values()):
            self._act(instance)

    def _act(self, instance: dict[str, Any]) -> None:
        """A placed instance runs at once (no process, no download); a terminating one stops at once.
        Acted on once per version of the row (its updated_at): a row that moves back to `scheduled`
        (the worker came back after being unreachable, a restart) is reported again."""
        state = instance.get("state")
        want = {"scheduled": "running", "terminating": "terminated"}.get(state)
        if want is None:
            return
        seen = (state, instance.get("updated_at"))
        if self.reported.get(instance["id"]) == seen:
            return
        self.reported[instance["id"]] = seen
        self.cluster.spawn(self._report(instance["id"], want))

    async def _report(self, instance_id: int, state: str) -> None:
        config = self.cluster.config
        body = {"state": state, "message": "simulated: no backend process runs"}
        for attempt in range(8):
            headers = None
            try:
                async with self.cluster.http.put(f"{config.server_url}/v2/agent/instances/{instance_id}/status",
                                                 json=body, headers=self._auth()) as response:
                    await response.read()
                    if response.status < 300 or response.status in (404, 409):
                        self.cluster.stats.reports += 1
                        return
                    if response.status in backoff.BUSY:
                        self.cluster.stats.busy += 1
                        headers = response.headers
                    else:
                        self.cluster.stats.error(f"report {response.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.cluster.stats.error(f"report {type(exc).__name__}")
            await asyncio.sleep(backoff.delay(attempt, headers))
        self.reported.pop(instance_id, None)  # the next watch event tries again

    # --- life and death -------------------------------------------------------------

    def start(self) -> None:
        self.alive = True
        self.tasks = [asyncio.create_task(self.heartbeat_loop(), name=f"{self.name}-heartbeat"),
                      asyncio.create_task(self.watch_loop(), name=f"{self.name}-watch")]

    async def stop(self) -> None:
        self.alive = False
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []


class SimulatedCluster:
    def __init__(self, config: SimulateConfig):
        self.config = config
        self.stats = Stats()
        self.workers = [SimulatedWorker(self, i) for i in range(config.workers)]
        self.http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()  # every worker registered

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout))

        async def join(worker: SimulatedWorker) -> None:
            await worker.register()
            worker.start()

        async def join_all() -> None:
            joins = []
            for worker in self.workers:
                joins.append(asyncio.create_task(join(worker)))
                await asyncio.sleep(1 / self.config.register_rate)
            await asyncio.gather(*joins)
            self.ready.set()

        self.spawn(join_all())
        self.spawn(self._measure_loop())
        if self.config.kill_rate > 0:
            self.spawn(self._failures())

    async def _measure_loop(self) -> None:
        while True:
            planned = time.monotonic() + 0.1
            await asyncio.sleep(0.1)
            self.stats.loop_lags.append(max(0.0, time.monotonic() - planned))
            if len(self.stats.loop_lags) > 100_000:
                del self.stats.loop_lags[:50_000]

    async def _failures(self) -> None:
        while True:
            await asyncio.sleep(random.expovariate(self.config.kill_rate / 60))
            alive = [w for w in self.workers if w.alive and w.tasks]
            if not alive:
                continue
            victim = random.choice(alive)
            await victim.stop()
            self.stats.killed += 1
            log.info("simulated failure: %s stopped", victim.name)
            if self.config.flap:
                self.spawn(self._revive(victim))

    async def _revive(self, worker: SimulatedWorker) -> None:
        await asyncio.sleep(self.config.flap_down)
        worker.start()
        self.stats.revived += 1
        log.info("simulated failure: %s back", worker.name)

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.http:
            await self.http.close()

    def status_line(self, window: float) -> str:
        now = time.monotonic()
        p50, p99, count = self.stats.heartbeat_percentiles(now - window)
        running = sum(1 for w in self.workers for i in w.instances.values() if i.get("state") == "running")
        alive = sum(1 for w in self.workers if w.alive)
        return (f"workers {self.stats.registered}/{len(self.workers)} registered, {alive} alive | "
                f"heartbeats {count / window:.0f}/s p50 {p50:.0f} ms p99 {p99:.0f} ms | "
                f"instances running {running} | busy {self.stats.busy} | errors {sum(self.stats.errors.values())}"
                + (f" | killed {self.stats.killed} revived {self.stats.revived}" if self.stats.killed else ""))


def run_loop(main: Any) -> Any:
    """Run `main` on uvloop where it is installed (as `maas start` does). One process stands in for a
    thousand agents: its own loop's overhead is counted in every latency it measures, so it should be
    as small as it can be."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def run(config: SimulateConfig, duration: float | None = None, report_every: float = 10.0,
              summary_path: str | None = None, echo: Any = print) -> dict[str, Any]:
    """Run the simulated cluster for `duration` seconds (None: until cancelled), printing a status line
    every `report_every` seconds; returns (and writes to `summary_path`) the summary with every
    heartbeat's time and latency."""
    cluster = SimulatedCluster(config)
    await cluster.start()
    started = time.monotonic()

    async def settle() -> None:
        # Registered: the workers' state lives as long as the run. Out of the collector's full passes
        # (which walked it for up to 130 ms at 500 workers), as server/heap.py does for the server.
        await cluster.ready.wait()
        gc.collect()
        gc.freeze()

    cluster.spawn(settle())

    def summarize() -> dict[str, Any]:
        summary = cluster.stats.summary() | {
            "started_monotonic": cluster.stats.started,  # CLOCK_MONOTONIC: comparable across processes
            "heartbeat_samples": [(round(t - cluster.stats.started, 3), round(d * 1000, 2))
                                  for t, d in cluster.stats.heartbeats]}
        if summary_path:
            with open(summary_path + ".tmp", "w") as handle:
                json.dump(summary, handle)
            os.replace(summary_path + ".tmp", summary_path)
        return summary

    try:
        while duration is None or time.monotonic() - started < duration:
            await asyncio.sleep(min(report_every, duration - (time.monotonic() - started)) if duration else report_every)
            echo(cluster.status_line(report_every))
    finally:  # also on Ctrl-C / SIGINT (the run is cancelled)
        summary = summarize()
        await cluster.stop()
    return summary
