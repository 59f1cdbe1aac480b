"""Alerts through the real server and agent (SQLite): a crash-looping custom backend raises InstanceFailing,
which is recorded, published on the watch and POSTed to a webhook receiver (aiohttp on 127.0.0.1) that fails
twice before it accepts (retries, one delivery id, a valid HMAC signature); a silence keeps a second model's
alert from the webhook; a fixed spec resolves the alert. Plus the pure parts: rules table, URL checks."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from typer.testing import CliRunner

from agent.agent import Agent, AgentConfig
from conftest import eventually, free_port
from maas_tui.cli.alert_cmds import parse_duration
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from maas_tui.tui.app import MaasApp
from maas_tui.tui.views.alerts import AlertsScreen
from server.alerts.rules import RULES
from server.alerts.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from server.app import MaasServer
from server.config import ServerConfig
from server.events import record_event
from server.schemas.alerts import RULE_NAMES, webhook_url_problem
from test_tui import command, screen_text, until

pytestmark = pytest.mark.timeout(240)

SECRET = "webhook-secret-1"
BENCH_BACKEND = {
    "name": "bench",
    "description": "tests/bench_backend.py: streams one-word chunks, or crashes with --crash",
    "command": [sys.executable, str(Path(__file__).parent / "bench_backend.py"), "--host", "{host}",
                "--port", "{port}", "--model-name", "{model_name}"],
    "health_path": "/health",
    "metrics_path": None,
}


def bench_model(name: str, source: Path, args: list[str], replicas: int = 1) -> dict:
    return {"name": name, "source": str(source), "backend": "custom:bench", "replicas": replicas, "cpu_only": True,
            "memory_bytes": 10**7, "args": args}


@pytest.fixture
async def server(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MaasServer]:
    monkeypatch.setenv("MAAS_ALERT_INTERVAL", "0.3")
    monkeypatch.setenv("MAAS_ALERT_WEBHOOK_BACKOFF", "0.05")
    monkeypatch.setenv("MAAS_ALERT_EVENT_QUIET_SECONDS", "2")
    monkeypatch.setenv("MAAS_ALERT_GPU_TEMPERATURE", "90")
    config = ServerConfig(data_dir=tmp_path / "data", port=free_port(), database_url=store_url, resync_interval=2.0,
                          worker_timeout=4.0)
    srv = MaasServer(config)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class Receiver:
    """A webhook receiver that answers 503 to its first `failures` requests, then 200."""

    def __init__(self, failures: int):
        self.failures = failures
        self.requests: list[tuple[dict, bytes, int]] = []  # headers, body, the status answered

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 503 if len(self.requests) < self.failures else 200
        self.requests.append((dict(request.headers), body, status))
        return web.Response(status=status)

    def accepted(self) -> list[dict]:
        return [json.loads(body) for _, body, status in self.requests if status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver(failures=2)
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield hooks, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@pytest.fixture
async def agent(server: MaasServer, tmp_path: Path) -> AsyncIterator[Agent]:
    local = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="worker-1", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=0.2))
    await local.start()
    await asyncio.wait_for(local.registered.wait(), 10)
    try:
        yield local
    finally:
        await local.stop()


async def _alert(admin: MaasClient, model: str, state: str):
    return next((a for a in await admin.list_alerts(state) if a.object_name == model and a.rule == "InstanceFailing"),
                None)


async def test_a_crash_loop_fires_is_delivered_signed_after_retries_silenced_and_resolved(
        server: MaasServer, admin: MaasClient, agent: Agent, receiver, tmp_path: Path):
    hooks, url = receiver
    with pytest.raises(ApiClientError) as refused:
        await admin.add_webhook("ftp://127.0.0.1/hook")
    assert refused.value.status == 422 and "http" in str(refused.value.details) + refused.value.message
    hook = await admin.add_webhook(url, secret=SECRET)
    assert hook.signed and [h.url for h in await admin.list_webhooks()] == [url]
    silence = await admin.silence("InstanceFailing", 3600, object_name="muted", comment="known bad")
    assert silence.active

    await admin.add_backend(BENCH_BACKEND)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")
    await admin.create_model(bench_model("crashy", source, ["--crash"]))
    await admin.create_model(bench_model("muted", source, ["--crash"]))

    for model in ("crashy", "muted"):
        await eventually(lambda: _alert(admin, model, "firing"), timeout=90, message=f"{model}'s alert firing")
    crashy, muted = await _alert(admin, "crashy", "firing"), await _alert(admin, "muted", "firing")
    assert crashy.severity == "critical" and not crashy.silenced and "failing" in crashy.message
    assert muted.silenced

    # The receiver refused twice; the third try of the same delivery got through, signed.
    await eventually(lambda: _async(any(n["alert"]["object_name"] == "crashy" for n in hooks.accepted())),
                     message="the firing alert delivered")
    tries = [(headers, body) for headers, body, _ in hooks.requests
             if json.loads(body)["alert"]["object_name"] == "crashy" and json.loads(body)["status"] == "firing"]
    assert len(tries) == 3 and len({headers[DELIVERY_HEADER] for headers, _ in tries}) == 1
    assert all(verify(SECRET, headers, body) for headers, body in tries)
    headers, body = tries[-1]
    assert headers[SIGNATURE_HEADER].startswith("sha256=") and len(headers[SIGNATURE_HEADER]) == 7 + 64
    assert not verify("another-secret", headers, body) and not verify(SECRET, headers, body + b" ")
    assert json.loads(body)["alert"]["rule"] == "InstanceFailing"

    async def delivered() -> bool:  # written once the answer is in: just after the receiver saw the request
        return "HTTP 200" in (await admin.list_webhooks())[0].last_status
    await eventually(delivered, message="the delivery's status recorded")

    # Recorded as an event; seen on the watch; not seen by a member of another team.
    events = await admin.list_events(kind="alerts")
    assert any(e.reason == "AlertFiring" and e.object_name == "InstanceFailing/crashy" for e in events)
    async for message in admin.watch(["alerts"]):
        assert {a["object_name"] for a in message.items["alerts"]} >= {"crashy", "muted"}
        break
    await admin.create_team("blue")
    await admin.create_user("otto", "password-123", role="member", teams=["blue"])
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("otto", "password-123")).token
    async with MaasClient(server.url, token) as otto:
        assert await otto.list_alerts() == []
        with pytest.raises(ApiClientError) as forbidden:
            await otto.silence("InstanceFailing", 600)
        assert forbidden.value.status == 403

    # A fixed spec: the new generation runs, the failing instances go, the alert resolves and is delivered.
    await admin.update_model("crashy", {"args": []})
    await eventually(lambda: _alert(admin, "crashy", "resolved"), timeout=90, message="crashy's alert resolved")
    await eventually(lambda: _async(any(n["status"] == "resolved" and n["alert"]["object_name"] == "crashy"
                                        for n in hooks.accepted())), message="the resolution delivered")
    assert not any(json.loads(body)["alert"]["object_name"] == "muted" for _, body, _ in hooks.requests)

    expired = await admin.expire_silence(silence.id)
    assert not expired.active


async def test_state_and_event_rules_fire_and_resolve(server: MaasServer, admin: MaasClient, tmp_path: Path):
    # A worker that registers and never sends a heartbeat: not ready after worker_timeout.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/agent/register", json={"name": "silent", "address": "127.0.0.1",
                                                                      "agent_port": 1},
                             headers={"Authorization": f"Bearer {server.cluster_token}"}) as response:
            worker_id = (await response.json())["worker"]["id"]
    # Its GPU 0 reported at 95 °C (what a heartbeat puts in the live telemetry), GPU 1 at 60 °C.
    server.telemetry.update(worker_id, {"gpus": [{"index": 0, "temperature": 95.0}, {"index": 1, "temperature": 60.0}]})
    # Another helper's drift check and the gateway's limits record these events; here one of each.
    async with server.db.session() as s:
        record_event(s, "instances", SimpleNamespace(id=None, name="chat-abc123", team="default"), "MemoryDrift",
                     "uses 2.1 GB of its 1.0 GB claim; suggested --memory 3GiB", "telemetry")
        record_event(s, "teams", SimpleNamespace(id=None, name="default", team="default"), "LimitNearlyReached",
                     "team default used 91% of its daily token budget", "gateway")
        await s.commit()

    async def raised() -> set[tuple[str, str]]:  # the event rules may have resolved again already (2 s)
        return {(a.rule, a.object_name) for a in await admin.list_alerts("all")}
    expected = {("WorkerNotReady", "silent"), ("GpuTemperature", "silent/gpu0"), ("MemoryDrift", "chat-abc123"),
                ("LimitNearlyReached", "default")}
    await eventually(lambda: _contains(raised(), expected), timeout=60, message="every rule raised")
    assert ("GpuTemperature", "silent/gpu1") not in await raised()
    drift = next(a for a in await admin.list_alerts() if a.rule == "MemoryDrift")
    assert drift.team == "default" and "suggested --memory 3GiB" in drift.message and drift.object_kind == "instances"

    listed = await asyncio.to_thread(cli, server, admin.token, tmp_path, "alert", "list", "--state", "firing")
    assert listed.exit_code == 0 and "WorkerNotReady" in listed.output and "silent/gpu0" in listed.output
    silenced = await asyncio.to_thread(cli, server, admin.token, tmp_path, "alert", "silence", "GpuTemperature",
                                       "--object", "silent/gpu0", "--for", "2h")
    assert silenced.exit_code == 0, silenced.output
    shown = await asyncio.to_thread(cli, server, admin.token, tmp_path, "alert", "silence", "list")
    assert "GpuTemperature" in shown.output and "silent/gpu0" in shown.output
    bad = await asyncio.to_thread(cli, server, admin.token, tmp_path, "alert", "webhook", "add", "file:///etc/passwd")
    assert bad.exit_code == 2 and "http" in bad.output

    # The TUI: the header counts what fires (the watch's snapshot), :alerts lists it; at 80x24.
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.state.connected and app.state.summary().alerts_firing >= 1, what="alerts")
        assert "alerts" in screen_text(app).splitlines()[0]
        await command(pilot, "alerts")
        await until(pilot, lambda: isinstance(app.screen, AlertsScreen) and "WorkerNotReady" in screen_text(app),
                    what="the alerts view")
        assert "worker/silent" in screen_text(app)

    # Cooled down and deleted; the event rules resolve after their quiet time (2 s here).
    server.telemetry.update(worker_id, {"gpus": [{"index": 0, "temperature": 70.0}]})
    await admin.delete_worker("silent")

    async def resolved() -> set[tuple[str, str]]:
        return {(a.rule, a.object_name) for a in await admin.list_alerts("resolved")}
    await eventually(lambda: _contains(resolved(), expected), timeout=60, message="every alert resolved")


async def _contains(found, expected: set) -> bool:
    return expected <= await found


def cli(server, token: str, tmp_path: Path, *args: str):
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": token, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "250"}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def _async(value: bool) -> bool:
    return value


def test_the_rules_table_and_inputs():
    assert tuple(RULES) == RULE_NAMES
    assert {r.name for r in RULES.values() if r.events} == {"MemoryDrift", "LimitNearlyReached"}
    assert all((r.check is None) != (not r.events) for r in RULES.values())  # one trigger each
    assert webhook_url_problem("https://example.com/x") == ""
    for bad in ("ftp://h/x", "http:///x", "http://u:p@h/x", "http://h/a b", "javascript:alert(1)"):
        assert webhook_url_problem(bad), bad
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    for bad in ("2", "10s", "40d", "h2"):
        with pytest.raises(Exception):
            parse_duration(bad)
