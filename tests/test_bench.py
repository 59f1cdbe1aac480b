"""`maas bench` and the rollout bench gate through the real server, agent and gateway (SQLite), with the
streaming test backend (tests/bench_backend.py): a sweep through the gateway is stored per generation; a
rollout to a deliberately slower spec (a first-token delay argument) holds at its first new replica, is
benched against the old one by the leader and paused with the reason, and goes on when resumed. Plus the
pure parts: the gate's grammar and the rollout plan's hold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import eventually
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server.controllers.rollout import InstanceView, gate_pending, plan
from server.schemas.bench import BenchLevel, GateError, parse_gate, percentile
from test_alerts import BENCH_BACKEND, agent, bench_model  # noqa: F401  (the agent fixture)

pytestmark = pytest.mark.timeout(240)


def cli(server, key: str, tmp_path: Path, *args: str):
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": key, "MAAS_CONFIG": str(tmp_path / "cli.json"), "COLUMNS": "200"}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def _instances(admin: MaasClient, name: str) -> list:
    return await admin.list_instances(name)


async def test_bench_sweep_is_stored_and_the_gate_pauses_a_slower_rollout(server, admin: MaasClient, api_key: str,
                                                                           agent, tmp_path: Path):
    await admin.add_backend(BENCH_BACKEND)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")
    await admin.create_model(bench_model("quick", source, ["--first-token-delay", "0.01"]))

    async def running(generation: int) -> bool:
        return any(i.state == "running" and i.generation == generation for i in await _instances(admin, "quick"))
    await eventually(lambda: running(1), timeout=90, message="generation 1 running")

    swept = await asyncio.to_thread(cli, server, api_key, tmp_path, "bench", "quick", "--concurrency", "1,2",
                                    "--requests", "4", "--max-tokens", "8", "--prompt-tokens", "8")
    assert swept.exit_code == 0, swept.output
    assert "TTFT p95" in swept.output and "stored as result" in swept.output
    history = await admin.bench_history("quick")
    [result] = history.results
    assert result.generation == 1 and result.source == "cli" and [x.concurrency for x in result.levels] == [1, 2]
    assert all(x.errors == 0 and x.output_tokens == x.requests * 8 and x.ttft_p50 >= 10 for x in result.levels), result

    refused = await asyncio.to_thread(cli, server, api_key, tmp_path, "bench", "gate", "quick", "ttft_p95 <= eval(1)")
    assert refused.exit_code == 2 and "METRIC OP" in refused.output
    with pytest.raises(ApiClientError) as bad:
        await admin.set_bench_gate("quick", "__import__('os') <= 1")
    assert bad.value.status == 422
    gated = await asyncio.to_thread(cli, server, api_key, tmp_path, "bench", "gate", "quick", "ttft_p95 <= 500")
    assert gated.exit_code == 0 and "gated on 'ttft_p95 <= 500'" in gated.output, gated.output

    # Generation 2 waits 0.3 s before its first token: 30 times slower. Rolled out by `maas apply`, whose
    # --bench-gate replaces the gate set above.
    document = tmp_path / "quick.yaml"
    document.write_text(yaml.safe_dump(bench_model("quick", source, ["--first-token-delay", "0.3"])))
    applied = await asyncio.to_thread(cli, server, api_key, tmp_path, "apply", "-f", str(document),
                                      "--bench-gate", "ttft_p95 <= 1.5 * previous")
    assert applied.exit_code == 0 and "rollout" in applied.output, applied.output
    assert (await admin.bench_history("quick")).gate.expression == "ttft_p95 <= 1.5 * previous"

    async def paused() -> bool:
        return (await admin.get_model("quick")).paused
    await eventually(paused, timeout=90, message="the rollout paused by the gate")
    model = await admin.get_model("quick")
    assert "bench gate" in model.rollout_message and "ttft_p95" in model.rollout_message
    instances = await _instances(admin, "quick")
    assert sorted((i.generation, i.state) for i in instances) == [(1, "running"), (2, "running")]
    events = await admin.list_events(name="quick")
    assert any(e.reason == "BenchGateFailed" for e in events)
    gate_results = [r for r in (await admin.bench_history("quick")).results if r.source == "gate"]
    assert sorted(r.generation for r in gate_results) == [1, 2]
    slow = next(r for r in gate_results if r.generation == 2).levels[0]
    assert slow.ttft_p50 >= 300
    shown = await asyncio.to_thread(cli, server, api_key, tmp_path, "bench", "history", "quick")
    assert shown.exit_code == 0 and "ttft_p95 <= 1.5 * previous" in shown.output and "gate (" in shown.output

    async def stalled(state: str) -> bool:
        return any(a.rule == "RolloutStalled" and a.object_name == "quick" and "bench gate" in a.message
                   for a in await admin.list_alerts(state))
    await eventually(lambda: stalled("firing"), timeout=60, message="the RolloutStalled alert")

    # The operator accepts it: resumed, the rollout completes and the alert resolves.
    await admin.rollout_action("quick", "resume")

    async def complete() -> bool:
        return (await admin.rollout_status("quick")).complete
    await eventually(complete, timeout=90, message="the rollout complete after resume")
    await eventually(lambda: stalled("resolved"), timeout=60, message="the RolloutStalled alert resolved")


def test_the_gate_grammar():
    gate = parse_gate("ttft_p95 <= 1.1 * previous")
    assert (gate.metric, gate.op, gate.factor, gate.relative) == ("ttft_p95", "<=", 1.1, True)
    assert parse_gate("tokens_per_s >= 0.9 × previous").relative
    assert not parse_gate("error_rate < 0.05").relative
    for bad in ("ttft <= 1", "ttft_p95 <= 1.1 * 2", "ttft_p95 == 1", "ttft_p95 <= previous * 2", "", "x" * 300):
        with pytest.raises(GateError):
            parse_gate(bad)
    before, after = BenchLevel(concurrency=1, requests=4, ttft_p95=100.0), BenchLevel(concurrency=1, requests=4,
                                                                                        ttft_p95=120.0)
    assert gate.judge(after, before)[0] is False and gate.judge(before, before)[0] is True
    assert gate.judge(after, None)[0] is None  # nothing to compare with
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 95) is None


def test_the_rollout_holds_after_the_first_new_replica_until_the_gate_judged():
    assert gate_pending({"expression": "x"}, 1, 2) and not gate_pending({"expression": "x"}, 2, 2)
    assert not gate_pending(None, 0, 2)
    old = [InstanceView(1, "running", outdated=True), InstanceView(2, "running", outdated=True)]
    first = plan(2, old, max_surge=2, hold_new=True)
    assert first.create == 1 and first.remove == []  # one new instance, not two
    up = plan(2, [*old, InstanceView(3, "running")], max_surge=2, hold_new=True)
    assert up.create == 0 and up.remove == []  # judged first: no old one goes
    assert plan(2, [*old, InstanceView(3, "running")], max_surge=2).remove == [1]  # without a gate it would
