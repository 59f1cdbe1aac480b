"""The process runtime adopts the workloads a previous agent left running instead of restarting them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from agent.agent import Agent, AgentConfig
from conftest import eventually
from maas_tui.client import MaasClient

pytestmark = pytest.mark.timeout(90)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _config(server, data_dir: Path) -> AgentConfig:
    return AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=data_dir, name="phoenix",
                       address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=0.2)


async def _crash(agent: Agent) -> None:
    """The agent dies without stopping its workloads (as a killed agent process would)."""
    agent.main_task.cancel()
    for workload in agent.workloads.values():
        workload.task.cancel()
    await asyncio.gather(agent.main_task, *(w.task for w in agent.workloads.values()), return_exceptions=True)
    await agent.endpoint.close()
    await agent.api.close()


async def test_restarted_agent_adopts_running_processes_and_stops_unwanted_ones(server, admin: MaasClient,
                                                                               tmp_path: Path, tiny_model: Path):
    first = Agent(_config(server, tmp_path / "agent"))
    await first.start()
    await admin.create_model({"name": "keep", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
    await admin.create_model({"name": "drop", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})

    async def both_running() -> bool:
        instances = await admin.list_instances()
        return len(instances) == 2 and all(i.state == "running" for i in instances)

    await eventually(both_running, message="both instances running")
    keep = (await admin.list_instances("keep"))[0]
    drop = (await admin.list_instances("drop"))[0]
    await _crash(first)
    assert _alive(keep.pid) and _alive(drop.pid)

    # While no agent runs, `drop` is deleted: the next agent must stop its process, not adopt it.
    await admin.delete_model("drop")
    second = Agent(_config(server, tmp_path / "agent"))
    await second.start()
    try:
        await eventually(lambda: _gone(drop.pid), message="the unwanted left-over process stopped")

        async def adopted() -> bool:
            workload = second.workloads.get(keep.id)
            return workload is not None and workload.state == "running"

        await eventually(adopted, message="the left-over instance adopted")
        now = (await admin.list_instances("keep"))[0]
        assert (now.id, now.pid, now.port, now.state) == (keep.id, keep.pid, keep.port, "running")
        assert "adopted" in now.state_message
        assert keep.port in second.ports.in_use
        async for piece in admin.chat("keep", "hi", max_tokens=3):
            assert isinstance(piece, str)
    finally:
        await second.stop()
    assert await _gone(keep.pid)  # a normal stop still stops adopted workloads


async def _gone(pid: int) -> bool:
    return not _alive(pid)


async def test_a_command_that_exits_at_once_is_started_and_waited_for(tmp_path):
    """The child may be reaped before its start time is read: start still returns a handle."""
    from agent.runtimes.process import ProcessRuntime, _alive

    runtime = ProcessRuntime(tmp_path / "run")
    for _ in range(20):  # the race is narrow: try it a few times
        handle = await runtime.spawn("quick", ["/bin/true"], {}, tmp_path / "quick.log")
        assert await runtime.wait(handle) == 0
        assert not _alive(handle.pid, 0.0)
