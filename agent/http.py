"""The agent's own HTTP endpoint, for the server (and Prometheus): its instances' logs (tail and follow),
`/metrics` (host, GPUs and every running instance's metrics, unified), `/doctor` (this host's checks),
`/healthz`. Every route but /healthz needs the server's credential for this agent (the agent secret it
was given at registration); /metrics also takes MAAS_METRICS_TOKEN.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING

from aiohttp import web

from agent import doctor, metrics
from agent.devices import host_info
from agent.logs import tail_lines
from server.schemas.telemetry import DoctorReport, DoctorRequest

if TYPE_CHECKING:
    from agent.agent import Agent


class AgentEndpoint:
    """Serves what the agent knows: its configuration, its server identity (agent.api), its workloads."""

    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on the agent's address and port (0: a free one, then written back into the config)."""
        app = web.Application()
        app.router.add_get("/healthz", _ok)
        app.router.add_get("/instances/{id}/logs", self.handle_logs)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_post("/doctor", self.handle_doctor)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.agent.config.address, self.agent.config.port)
        await site.start()
        self.agent.config.port = self.runner.addresses[0][1]

    def refusal(self, request: web.Request, *also: str | None) -> web.Response | None:
        """401 unless the request presents the server's credential for this agent (the agent secret it was
        given at registration) or one of `also`. Logs and metrics say what runs here: never anonymous."""
        presented = request.headers.get("Authorization", "")
        accepted = [f"Bearer {secret}" for secret in (self.agent.api.agent_secret, *also) if secret]
        if any(hmac.compare_digest(presented.encode(), bearer.encode()) for bearer in accepted):
            return None
        return web.json_response({"error": {"code": "unauthorized", "message": "this endpoint needs the server's "
                                            "credential (or, for /metrics, the agent's MAAS_METRICS_TOKEN)"}},
                                 status=401, headers={"WWW-Authenticate": "Bearer"})

    async def handle_logs(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.refusal(request)) is not None:
            return refused
        instance_id, tail = request.match_info["id"], request.query.get("tail", "200")
        if not (instance_id.isascii() and instance_id.isdigit() and len(instance_id) < 19):
            return web.json_response({"error": {"code": "not_found", "message": "no such instance"}}, status=404)
        if not (tail.lstrip("-").isascii() and tail.lstrip("-").isdigit() and len(tail) < 10):
            return web.json_response({"error": {"code": "bad_request", "message": "tail: a whole number"}}, status=400)
        tail = int(tail)
        path = self.agent.log_path(int(instance_id))
        if request.query.get("previous") == "1":
            path = path.with_suffix(".previous.log")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        offset = path.stat().st_size if path.exists() else 0  # the tail ends here and following starts here
        try:
            await response.write(await asyncio.to_thread(tail_lines, path, tail, offset))
            while request.query.get("follow") == "1":
                workload = self.agent.workloads.get(int(instance_id))
                size = path.stat().st_size if path.exists() else 0
                if size > offset:
                    with open(path, "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read(size - offset)
                    offset = size
                    await response.write(chunk)
                elif (workload.exited if workload else int(instance_id) not in self.agent.desired):
                    break  # nothing more will come (a starting instance is followed until its log appears)
                await asyncio.sleep(0.25)
            await response.write_eof()
        except ConnectionResetError:  # the reader left
            pass
        return response

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: host, GPUs, instance states and each running instance's metrics, unified."""
        if (refused := self.refusal(request, self.agent.config.metrics_token)) is not None:
            return refused
        samples: list[metrics.InstanceSample] = []
        scrapes = []
        for workload in list(self.agent.workloads.values()):
            if workload.state not in metrics.INSTANCE_STATES:
                continue
            instance = workload.instance
            sample = metrics.InstanceSample(instance=instance.name, model=instance.model_name,
                                            backend=instance.spec.backend, state=workload.state,
                                            metrics=workload.launch.metrics if workload.launch else None)
            samples.append(sample)
            if workload.state == "running" and workload.launch and workload.launch.metrics_path and workload.port:
                url = f"http://{self.agent.config.address}:{workload.port}{workload.launch.metrics_path}"
                scrapes.append((sample, metrics.scrape(self.agent.api.http, url, key=workload.launch.api_key)))
        for sample, text in zip([s for s, _ in scrapes], await asyncio.gather(*(c for _, c in scrapes))):
            sample.scraped = text
        inventory = self.agent.gpus
        gpus, host = await asyncio.to_thread(lambda: (inventory.read(), host_info()))
        body = metrics.render(metrics.families(host, gpus, samples, self.agent.config.name, inventory.power_watts))
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def handle_doctor(self, request: web.Request) -> web.Response:
        """`maas doctor`: this host's checks (agent/doctor.py), for the server that asks with our secret."""
        if (refused := self.refusal(request)) is not None:
            return refused
        try:
            asked = DoctorRequest.model_validate(await request.json())
        except ValueError as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)[:300]}}, status=400)
        checks = await doctor.run_checks(self.agent, asked.server_time, asked.peers)
        return web.json_response(DoctorReport(worker=self.agent.config.name, checks=checks).model_dump(mode="json"))

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def _ok(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
