"""A removed instance keeps serving until its backend holds no request (agent/drain.py), not a fixed time.

The integration test removes an instance (scale to zero) while a long answer streams from it, through
the real gateway, agent and llama.cpp backend, with a fixed minimum (`drain_seconds`) far shorter than
the stream: the stream still ends with its usage and [DONE], then the backend stops and a `Drained`
event says how long it took. The decision itself (the in-flight count read from the metrics, the
fallback without one, the maximum) is checked on its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from agent.agent import Agent, AgentConfig
from agent.drain import counts_in_flight, drain, in_flight
from agent.metrics import scrape
from conftest import eventually
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.schemas.backend_traits import LLAMACPP_METRICS, VLLM_METRICS

pytestmark = pytest.mark.timeout(120)

LLAMACPP_TEXT = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 40
"""
VLLM_TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
vllm:num_requests_running{engine="1",model_name="m"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
"""


def test_in_flight_is_running_plus_waiting_and_unknown_without_the_metric():
    assert in_flight(LLAMACPP_TEXT, LLAMACPP_METRICS) == 3
    assert in_flight(VLLM_TEXT, VLLM_METRICS) == 0  # summed over the backend's own labels
    assert in_flight("llamacpp:prompt_tokens_total 40\n", LLAMACPP_METRICS) is None  # answered, but no count
    assert in_flight("<html>not metrics</html>", LLAMACPP_METRICS) is None
    assert in_flight(None, LLAMACPP_METRICS) is None  # a failed scrape
    assert counts_in_flight(LLAMACPP_METRICS) and counts_in_flight({"tgi_queue_size": "requests_waiting"})
    assert not counts_in_flight({}) and not counts_in_flight(None)  # a custom backend without a metrics map
    assert not counts_in_flight({"x:tokens_total": "generation_tokens_total"})


async def test_drain_waits_for_zero_within_bounds_and_falls_back_to_the_minimum():
    def probe_of(*counts):
        answers = iter(counts)
        calls: list[float | None] = []

        async def probe():
            calls.append(next(answers))
            return calls[-1]
        return probe, calls

    probe, calls = probe_of(2, 1, 0)
    done = await drain(0.05, 5, probe, lambda: False, poll=0.01)
    assert (done.why, calls) == ("idle", [2, 1, 0]) and 0.05 <= done.seconds < 1
    assert "no request in flight" in done.describe()
    probe, calls = probe_of(*[4] * 1000)
    done = await drain(0.0, 0.1, probe, lambda: False, poll=0.01)
    assert (done.why, done.in_flight) == ("maximum", 4) and 0.1 <= done.seconds < 1
    assert "maximum" in done.describe() and "4 request(s)" in done.describe()
    probe, calls = probe_of(3, None)  # the scrape fails midway: no more waiting
    assert (await drain(0.0, 5, probe, lambda: False, poll=0.01)).why == "unknown"
    done = await drain(0.05, 5, None, lambda: False)  # no in-flight metric: the minimum alone
    assert done.why == "unknown" and 0.05 <= done.seconds < 1 and "fixed" in done.describe()
    probe, calls = probe_of(1)
    assert (await drain(0.0, 5, probe, lambda: True)).why == "exited" and calls == []


async def test_a_removed_instance_finishes_the_stream_in_flight_before_it_stops(
        server: MaasServer, admin: MaasClient, api_key: str, tiny_model: Path, tmp_path: Path):
    minimum = 0.3
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="drainer", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=minimum,
                              drain_max_seconds=60))
    await agent.start()
    try:
        # One slot of the model's whole context and one thread: a 2,000-token answer streams for 1-2 s here,
        # several times the fixed minimum (more threads only add jitter on a loaded machine).
        await admin.create_model({"name": "long", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1,
                                  "args": ["--parallel", "1", "--threads", "1"]})

        async def running() -> bool:
            instances = await admin.list_instances("long")
            return len(instances) == 1 and instances[0].state == "running"

        await eventually(running, timeout=60, message="long running")
        instance = (await admin.list_instances("long"))[0]
        launch = agent.workloads[instance.id].launch
        started = [asyncio.Event(), asyncio.Event()]
        lines: list[list[bytes]] = [[], []]

        async def stream(n: int) -> None:
            body = {"model": "long", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{server.url}/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {api_key}"}) as response:
                    assert response.status == 200, await response.text()
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            lines[n].append(line.strip())
                            started[n].set()

        async def backend_holds(count: int) -> bool:
            async with aiohttp.ClientSession() as http:
                text = await scrape(http, f"http://127.0.0.1:{instance.port}{launch.metrics_path}", key=launch.api_key)
            return in_flight(text, launch.metrics) == count

        # Two answers in flight: one streaming, one waiting for the single slot (llama.cpp defers it).
        first = asyncio.create_task(stream(0))
        await asyncio.wait_for(started[0].wait(), 30)
        second = asyncio.create_task(stream(1))
        await eventually(lambda: backend_holds(2), timeout=10, interval=0.02, message="two requests in the backend")
        await admin.update_model("long", {"replicas": 0})

        async def terminating() -> bool:
            return [i.state for i in await admin.list_instances("long")] == ["terminating"]

        await eventually(terminating, timeout=10, interval=0.02, message="long terminating")
        removed = time.monotonic()
        await asyncio.sleep(minimum + 0.4)
        # Honest only while the answers outlast the fixed minimum (a fixed drain would have cut them here).
        assert not second.done(), f"the streams ended within {minimum + 0.4} s of the removal: cut, or too short to tell"
        await asyncio.wait_for(asyncio.gather(first, second), 60)
        lasted = time.monotonic() - removed
        for answer in lines:
            assert answer[-1] == b"data: [DONE]", answer[-3:]
            usage = json.loads(answer[-2][len(b"data:"):])["usage"]
            assert usage["completion_tokens"] == 2000, usage

        async def gone() -> bool:
            return not await admin.list_instances("long")

        await eventually(gone, timeout=30, message="long terminated after its stream")
        assert not psutil.pid_exists(instance.pid) or psutil.Process(instance.pid).status() == psutil.STATUS_ZOMBIE
        drained = [e for e in await admin.list_events(name=instance.name) if e.reason == "Drained"]
        assert len(drained) == 1 and "no request in flight" in drained[0].message, drained
        print(f"\nthe streams went on {lasted:.2f} s after the removal; {drained[0].message}")
    finally:
        await agent.stop()
