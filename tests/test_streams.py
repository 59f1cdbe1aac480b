"""Watch streams have no line limit: readers split lines themselves, the server pages large snapshots,
a line far over aiohttp's 512 KiB neither stops an agent nor the TUI, and a crashed `maas tui` exits 1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import psutil
import pytest

from agent.agent import Agent, AgentConfig
from conftest import eventually
from maas_tui.client import MaasClient
from server.api import watch as watch_api
from server.db import tables
from server.ndjson import LineTooLong, json_lines, watch_messages

pytestmark = pytest.mark.timeout(180)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _collect(iterator: AsyncIterator) -> list:
    return [item async for item in iterator]


@pytest.mark.parametrize("chunk", [1, 7, 65536, 10**8])
async def test_json_lines_splits_any_chunking(chunk: int):
    big = json.dumps({"x": "y" * 3_000_000}).encode()  # 3 MB: six times aiohttp's line limit
    data = b'{"a":1}\n\n' + big + b"\n" + b'{"b":2}\n' + b'{"cut'
    lines = await _collect(json_lines(_chunks(data, chunk)))
    assert lines == [b'{"a":1}', big, b'{"b":2}']  # the blank line skipped, the cut last line dropped


async def test_a_line_over_the_bound_is_a_broken_stream():
    with pytest.raises(LineTooLong):
        await _collect(json_lines(_chunks(b"x" * 5000, 1000), max_line=4096))
    assert issubclass(LineTooLong, ValueError)  # every reader already reconnects on ValueError


async def test_watch_messages_joins_snapshot_pages():
    lines = [{"type": "snapshot", "version": 7, "more": True, "items": {"models": [{"id": 1}], "workers": []}},
             {"type": "snapshot", "version": 7, "more": True, "items": {"models": [{"id": 2}], "workers": [{"id": 9}]}},
             {"type": "snapshot", "version": 7, "items": {"models": [], "workers": []}},
             {"type": "heartbeat", "version": 7}]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    messages = await _collect(watch_messages(_chunks(data, 5)))
    assert messages == [{"type": "snapshot", "version": 7, "items": {"models": [{"id": 1}, {"id": 2}],
                                                                      "workers": [{"id": 9}]}},
                        {"type": "heartbeat", "version": 7}]
    with pytest.raises(ValueError):  # an event in the middle of a snapshot is a broken stream
        await _collect(watch_messages(_chunks(data.replace(b'"snapshot", "version": 7, "items"',
                                                           b'"event", "version": 7, "items"'), 50)))


async def _raw_snapshot_lines(server, token: str, kinds: str) -> list[bytes]:
    """The snapshot lines of a watch as sent (up to and including the one without `more`)."""
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v2/watch", params={"kinds": kinds},
                            headers={"Authorization": f"Bearer {token}"}) as response:
            async for line in json_lines(response.content.iter_any()):
                lines.append(line)
                if not json.loads(line).get("more"):
                    return lines
    return lines


async def test_large_snapshot_is_paged_and_the_tui_opens_1000_instances(server, admin: MaasClient,
                                                                       tiny_model: Path):
    from maas_tui.tui.app import MaasApp
    from test_tui import command, rows, until

    # No worker: 1,000 replicas stay pending (the model controller creates them all).
    await admin.create_model({"name": "crowd", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1000})

    async def all_there() -> bool:
        return len(await admin.list_instances()) == 1000

    await eventually(all_there, timeout=90, interval=0.5, message="1,000 pending instances")

    lines = await _raw_snapshot_lines(server, admin.token, "workers,models,instances,events")
    pages = [json.loads(line) for line in lines]
    assert len(pages) >= 3, [len(line) for line in lines]
    assert all(p["type"] == "snapshot" and p["version"] == pages[0]["version"] for p in pages)
    assert [p.get("more", False) for p in pages] == [True] * (len(pages) - 1) + [False]
    assert all(set(p["items"]) == {"workers", "models", "instances", "events"} for p in pages)
    assert max(len(line) for line in lines) < watch_api._PAGE_BYTES + 64 * 1024  # no line grows with the cluster
    assert sum(len(p["items"]["instances"]) for p in pages) == 1000
    print(f"\nsnapshot of 1,000 instances: {len(pages)} lines, {sum(map(len, lines)) / 1e6:.1f} MB, "
          f"longest {max(map(len, lines)) / 1024:.0f} KiB")

    # The client joins the pages into one snapshot.
    stream = admin.watch(["instances"])
    try:
        first = await asyncio.wait_for(anext(stream), 30)
    finally:
        await stream.aclose()
    assert first.type == "snapshot" and len(first.items["instances"]) == 1000 and not first.more

    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.state.connected and len(app.state.instances) == 1000, timeout=60,
                    what="1,000 instances in the TUI")
        await command(pilot, "instances")

        def instance_rows() -> int:
            try:
                return len(rows(app)) if "instance" in type(app.screen).__name__.lower() else 0
            except Exception:  # the view is still being mounted
                return 0

        await until(pilot, lambda: instance_rows() == 1000, timeout=60, what="1,000 rows in the instances view")
        assert app.is_running


async def test_agent_survives_a_watch_line_over_1_mb_and_keeps_serving(server, admin: MaasClient, tmp_path: Path,
                                                                      tiny_model: Path):
    """An instance row holding 1.5 MB (written straight to the database, as a server without today's caps
    could have stored it) reaches the agent as one 1.5 MB event line, then in a snapshot after an agent
    restart: the agent reads both, keeps its backend serving, and the restarted one adopts it."""
    from test_agent_adoption import _crash

    def config() -> AgentConfig:
        return AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                           name="bulky", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=0.2)

    first = Agent(config())
    await first.start()
    second = None
    try:
        await admin.create_model({"name": "keep", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})

        async def running() -> bool:
            instances = await admin.list_instances("keep")
            return len(instances) == 1 and instances[0].state == "running"

        await eventually(running, timeout=60, message="keep running")
        keep = (await admin.list_instances("keep"))[0]
        big = "m" * 1_500_000
        async with server.db.session() as s:
            row = await s.get(tables.ModelInstance, keep.id)
            row.state_message = big
            await s.commit()

        async def agent_read_it() -> bool:
            instance = first.desired.get(keep.id)
            return instance is not None and len(instance.state_message) == len(big)

        await eventually(agent_read_it, timeout=30, message="the 1.5 MB event line read by the agent")
        assert not first.main_task.done()
        async for piece in admin.chat("keep", "hi", max_tokens=3):
            assert isinstance(piece, str)

        # A killed agent's successor gets the 1.5 MB instance in its snapshot and adopts the backend.
        await _crash(first)
        assert psutil.pid_exists(keep.pid)
        second = Agent(config())
        await second.start()

        async def adopted() -> bool:
            workload = second.workloads.get(keep.id)
            return workload is not None and workload.state == "running"

        await eventually(adopted, timeout=30, message="the restarted agent adopts keep")
        assert len(second.desired[keep.id].state_message) >= len(big) or "adopted" in second.desired[keep.id].state_message
        assert (await admin.list_instances("keep"))[0].pid == keep.pid
        async for piece in admin.chat("keep", "hi", max_tokens=3):
            assert isinstance(piece, str)
        assert not second.main_task.done()
    finally:
        if second is not None:
            await second.stop()
        elif not first.main_task.done():
            await first.stop()


def test_a_crashed_tui_exits_1_with_one_line_and_the_log_path(tmp_path: Path):
    """Any crash of `maas tui` exits non-zero with a short message naming the log file (Textual's own
    traceback goes to that file, not over the user's terminal)."""
    script = """
import sys
from maas_tui.tui.app import MaasApp, run_app
from maas_tui.tui.demo import DemoClient
from maas_tui.tui.state import ClusterState


class BrokenClient(DemoClient):
    async def watch(self, kinds, since=None):
        raise RuntimeError("a bug in the client")
        yield


run_app(MaasApp(BrokenClient(ClusterState())), headless=True)
"""
    log = tmp_path / "state" / "tui.log"
    env = os.environ | {"MAAS_TUI_LOG": str(log)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 1, result.stderr
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1, result.stderr
    assert "RuntimeError: a bug in the client" in stderr[0] and str(log) in stderr[0]
    text = log.read_text()
    assert "a bug in the client" in text and "Traceback" in text
