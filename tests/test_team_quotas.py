"""Team quotas through the real server (SQLite, in-process) with simulated-GPU agents (agent/simulate.py:
real agent protocol, instances reported running at once, no backend process), the API and the CLI.

A team at its GPU quota gets its next instance `pending` with quota_exceeded (need / used / limit), in
the instance, describe, the dry run and the CLI; placing resumes when the quota is raised, and when
another instance of the team is deleted. Other teams are not held back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from agent.simulate import SimulateConfig, SimulatedCluster
from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server import schemas
from test_scheduler_api import BGE_M3, run_cli, scheduler_of, vllm_body

GB = 1000**3
GiB = 1024**3


@pytest.fixture
async def simulated(server):
    """Two simulated workers with 2 simulated 80 GB GPUs each."""
    cluster = SimulatedCluster(SimulateConfig(server_url=server.url, token=server.cluster_token or "", workers=2,
                                              gpus="2xH100-80GB", heartbeat_interval=1.0, name_prefix="quota"))
    await cluster.start()
    try:
        await asyncio.wait_for(cluster.ready.wait(), 30)
        yield cluster
    finally:
        await cluster.stop()


async def states(admin: MaasClient, model: str) -> list[str]:
    return sorted(i.state for i in await admin.list_instances(model))


async def team(admin: MaasClient, name: str) -> schemas.TeamOut:
    return next(t for t in await admin.list_teams() if t.name == name)


async def test_a_team_at_its_gpu_quota_waits_until_the_quota_is_raised_or_an_instance_goes(
        server, admin: MaasClient, simulated, api_key: str, tmp_path: Path):
    await admin.create_team("red")
    out = await admin.set_team_quota("red", schemas.TeamQuota(gpus=2))
    assert out.quota == schemas.TeamQuota(gpus=2) and out.usage == schemas.TeamUsage()

    await admin.create_model(vllm_body("emb", BGE_M3, replicas=3, team="red"))

    async def two_running_one_held() -> bool:
        instances = await admin.list_instances("emb")
        return (sorted(i.state for i in instances) == ["pending", "running", "running"]
                and any(i.schedule_reasons for i in instances))

    await eventually(two_running_one_held, timeout=30, message="2 running, the third pending on the quota")
    [held] = [i for i in await admin.list_instances("emb") if i.state == "pending"]
    [reason] = held.schedule_reasons
    assert (reason.reason, reason.team, reason.quota, reason.need, reason.used, reason.limit) == (
        "quota_exceeded", "red", "gpus", 1, 2, 2)
    assert "quota" in held.state_message
    red = await team(admin, "red")
    assert (red.usage.gpus, red.usage.replicas) == (2, 2) and red.usage.vram_bytes > 0

    # Another team is not held back by red's quota (the cluster has room).
    await admin.create_model(vllm_body("other", BGE_M3, replicas=1))
    await eventually(lambda: _equals(states(admin, "other"), ["running"]), timeout=30, message="default's model running")

    # The dry run and describe say the same, and the CLI shows it.
    evaluation = await admin.evaluate_model(vllm_body("more", BGE_M3, replicas=1, team="red"))
    assert evaluation.schedulable == 0
    assert [(r.reason, r.quota, r.used, r.limit) for r in evaluation.replicas[0].reasons] == [
        ("quota_exceeded", "gpus", 2, 2)]
    description = await admin.describe_model("emb")
    assert any(r.reason == "quota_exceeded" for i in description.instances for r in i.schedule_reasons)
    cli = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "describe", "emb")
    assert cli.exit_code == 0 and "quota_exceeded" in cli.output and "team red" in cli.output, cli.output

    # Raised: the third is placed. The scheduler learns of it from the bus (kind teams), not from a reload.
    scheduler = scheduler_of(server)
    resyncs = scheduler.stats["resyncs"]
    await admin.set_team_quota("red", schemas.TeamQuota(gpus=3))
    await eventually(lambda: _equals(_quota_of(scheduler, "red"), schemas.TeamQuota(gpus=3)), timeout=10,
                     message="the scheduler's snapshot has the new quota")
    assert scheduler.stats["resyncs"] == resyncs
    await eventually(lambda: _equals(states(admin, "emb"), ["running"] * 3), timeout=30,
                     message="the third placed after the quota was raised")
    assert (await team(admin, "red")).usage.gpus == 3

    # At the quota again: a second model of red waits, until an instance of red goes away.
    await admin.create_model(vllm_body("late", BGE_M3, replicas=1, team="red"))

    async def late_held() -> bool:
        instances = await admin.list_instances("late")
        return bool(instances) and [(r.reason, r.used, r.limit) for r in instances[0].schedule_reasons] == [
            ("quota_exceeded", 3, 3)]

    await eventually(late_held, timeout=30, message="red's second model pending on the quota")
    await admin.update_model("emb", {"replicas": 2})  # the controller deletes one of its instances
    await eventually(lambda: _equals(states(admin, "late"), ["running"]), timeout=30,
                     message="red's second model placed once an instance of red went away")
    red = await team(admin, "red")
    assert (red.usage.gpus, red.usage.replicas) == (3, 3)
    assert {i.worker_name for i in await admin.list_instances()} <= {w.name for w in simulated.workers}


async def _equals(value, expected) -> bool:
    return await value == expected


async def _quota_of(scheduler, team: str) -> schemas.TeamQuota | None:
    return scheduler.state.cluster.quotas.get(team)


async def test_quota_api_validates_and_only_admins_set_it(server, admin: MaasClient):
    await admin.create_team("red")
    await admin.create_user("mona", "password-123", role="member", teams=["red"])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin.token}"}) as http:
        for body in ({"gpus": -1}, {"gpus": "four"}, {"vram_bytes": 2**70}, {"cpus": 3}, [], {"replicas": 1.5}):
            async with http.put(server.url + "/v2/teams/red/quota", json=body) as response:
                payload = await response.json()
                assert response.status in (400, 422) and payload["error"]["code"], (body, payload)
        async with http.put(server.url + "/v2/teams/nobody/quota", json={"gpus": 1}) as response:
            assert response.status == 404
    assert (await team(admin, "red")).quota == schemas.TeamQuota()
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("mona", "password-123")).token
    async with MaasClient(server.url, token) as mona:
        with pytest.raises(ApiClientError) as refused:
            await mona.set_team_quota("red", schemas.TeamQuota(gpus=100))
        assert refused.value.status == 403
        # A member sees its team's quota and usage.
        await admin.set_team_quota("red", schemas.TeamQuota(gpus=4, ram_bytes=64 * GiB))
        [red] = await mona.list_teams()
        assert red.quota == schemas.TeamQuota(gpus=4, ram_bytes=64 * GiB) and red.usage == schemas.TeamUsage()
    events = [e for e in await admin.list_events() if e.kind == "teams" and e.reason == "QuotaSet"]
    assert events and "gpus=4" in events[-1].message


async def test_the_cli_sets_shows_and_clears_a_quota(server, admin: MaasClient, api_key: str, tmp_path: Path):
    await admin.create_team("red")

    def cli(*args: str):
        return run_cli(server, api_key, tmp_path, *args)

    out = await asyncio.to_thread(cli, "team", "quota", "red", "--gpus", "4", "--vram", "80GiB", "--replicas", "6")
    assert out.exit_code == 0, out.output
    assert (await team(admin, "red")).quota == schemas.TeamQuota(gpus=4, vram_bytes=80 * GiB, replicas=6)
    # Limits not given stay; 'unlimited' removes one.
    out = await asyncio.to_thread(cli, "team", "quota", "red", "--ram", "64GiB", "--replicas", "unlimited")
    assert out.exit_code == 0, out.output
    assert (await team(admin, "red")).quota == schemas.TeamQuota(gpus=4, vram_bytes=80 * GiB, ram_bytes=64 * GiB)
    out = await asyncio.to_thread(cli, "team", "list")
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if line.lstrip().startswith("red"))
    assert "0/4" in line and "0 B/80.0 GiB" in line and "0 B/64.0 GiB" in line and "0/-" in line, out.output
    out = await asyncio.to_thread(cli, "team", "describe", "red")
    assert out.exit_code == 0, out.output
    assert "unlimited" in out.output and "80.0 GiB" in out.output and "gpus" in out.output
    out = await asyncio.to_thread(cli, "team", "describe", "red", "-o", "json")
    assert json.loads(out.output)["quota"] == {"gpus": 4, "vram_bytes": 80 * GiB, "ram_bytes": 64 * GiB,
                                                 "replicas": None}
    out = await asyncio.to_thread(cli, "team", "quota", "red", "--clear", "--gpus", "1")
    assert out.exit_code == 0, out.output
    assert (await team(admin, "red")).quota == schemas.TeamQuota(gpus=1)
    out = await asyncio.to_thread(cli, "team", "quota", "red", "--clear")
    assert out.exit_code == 0 and (await team(admin, "red")).quota == schemas.TeamQuota()
    # Bad input: a usage error, nothing sent.
    for args, fragment in ((["--gpus", "many"], "whole number"), (["--vram", "lots"], "size"), ([], "at least one")):
        out = await asyncio.to_thread(cli, "team", "quota", "red", *args)
        assert out.exit_code == 2 and fragment in out.output, out.output
    out = await asyncio.to_thread(cli, "team", "quota", "nobody", "--gpus", "1")
    assert out.exit_code == 1 and "nobody" in out.output
    out = await asyncio.to_thread(cli, "team", "quota", "red", "--gpus", "9999999999")
    assert out.exit_code == 1 and "gpus" in out.output  # refused by the server (422)


async def test_a_team_made_again_under_a_deleted_name_starts_without_its_quota(server, admin: MaasClient):
    scheduler = scheduler_of(server)
    await admin.create_team("red")
    await admin.set_team_quota("red", schemas.TeamQuota(replicas=1))
    await eventually(lambda: _equals(_quota_of(scheduler, "red"), schemas.TeamQuota(replicas=1)), timeout=10,
                     message="the scheduler has red's quota")
    await admin.delete_team("red")
    await eventually(lambda: _equals(_quota_of(scheduler, "red"), None), timeout=10,
                     message="the scheduler forgot the deleted team's quota")
    await admin.create_team("red")
    assert (await team(admin, "red")).quota == schemas.TeamQuota()
