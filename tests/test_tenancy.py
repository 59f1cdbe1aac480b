"""Teams own models: what each team sees, secrets redacted in every read path, and membership changes
taking effect at once (the matrix of who may call what is tests/test_authorization.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server.services.access import REDACTED


async def _login(server, username: str) -> MaasClient:
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login(username, "password-123")).token
    return MaasClient(server.url, token)


@pytest.fixture
async def teams(server, admin: MaasClient, tiny_model: Path):
    await admin.create_team("red")
    await admin.create_team("blue")
    for name, role, team in (("mona", "member", "red"), ("vera", "viewer", "red"), ("otto", "member", "blue")):
        await admin.create_user(name, "password-123", role=role, teams=[team])
    clients = {name: await _login(server, name) for name in ("mona", "vera", "otto")}
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.close()


def _body(name: str, source: Path, **extra) -> dict:
    return {"name": name, "source": str(source), "backend": "llama.cpp", "replicas": 1,
            "worker_selector": {"nowhere": "x"}, **extra}


async def _watch_snapshot(server, token: str, kinds: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v2/watch", params={"kinds": kinds},
                            headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
            return json.loads(await response.content.readline())


async def test_each_team_sees_its_own_and_secrets_only_its_members(server, admin: MaasClient, teams, tiny_model):
    mona, vera, otto = teams["mona"], teams["vera"], teams["otto"]
    await mona.create_model(_body("red-llm", tiny_model, env={"HF_TOKEN": "hf_secret"}))  # her only team: red
    await otto.create_model(_body("blue-llm", tiny_model))
    with pytest.raises(ApiClientError) as caught:
        await otto.create_model(_body("sneak", tiny_model, team="red"))
    assert caught.value.status == 404
    with pytest.raises(ApiClientError) as caught:
        await vera.create_model(_body("look", tiny_model))  # a viewer of red deploys nowhere
    assert caught.value.status == 400 and "no team" in caught.value.message

    assert [m.name for m in await mona.list_models()] == ["red-llm"]
    assert [m.name for m in await otto.list_models()] == ["blue-llm"]
    assert {m.name for m in await admin.list_models()} == {"red-llm", "blue-llm"}
    assert (await mona.get_model("red-llm")).team == "red"

    # Secrets: the owning team's members and admins read them; viewers see the names only.
    await eventually(lambda: _instances(vera, "red-llm"), message="the instance of red-llm")
    assert (await mona.get_model("red-llm")).spec.env == {"HF_TOKEN": "hf_secret"}
    assert (await admin.get_model("red-llm")).spec.env == {"HF_TOKEN": "hf_secret"}
    reads = [(await vera.get_model("red-llm")).spec.env,
             (await vera.list_models())[0].spec.env,
             (await vera.request("GET", "/v2/models/red-llm/describe"))["model"]["spec"]["env"],
             (await vera.request("GET", "/v2/models/red-llm/describe"))["instances"][0]["spec"]["env"],
             (await vera.request("GET", "/v2/models/red-llm/history"))["items"][0]["spec"]["env"],
             (await vera.list_instances("red-llm"))[0].spec.env]
    snapshot = await _watch_snapshot(server, vera.token, "models,instances,events")
    reads += [m["spec"]["env"] for m in snapshot["items"]["models"]]
    reads += [i["spec"]["env"] for i in snapshot["items"]["instances"]]
    assert reads and all(env == {"HF_TOKEN": REDACTED} for env in reads), reads
    assert "hf_secret" not in json.dumps(snapshot)
    assert {m["name"] for m in snapshot["items"]["models"]} == {"red-llm"}
    assert {e["object_name"] for e in snapshot["items"]["events"]} <= {"red-llm", "vera"} | {
        i["name"] for i in snapshot["items"]["instances"]}

    # Another team's model does not exist for Otto, in /v2 and in /v1.
    with pytest.raises(ApiClientError) as caught:
        await otto.get_model("red-llm")
    assert caught.value.status == 404
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {otto.token}"},
                             json={"model": "red-llm", "messages": [{"role": "user", "content": "hi"}]}) as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "model_not_found"


async def _instances(client: MaasClient, model: str) -> bool:
    return bool(await client.list_instances(model))


async def test_a_membership_change_takes_effect_at_once(server, admin: MaasClient, teams, tiny_model):
    otto = teams["otto"]
    await admin.create_model(_body("red-only", tiny_model, team="red", replicas=0))
    with pytest.raises(ApiClientError):
        await otto.get_model("red-only")
    await admin.set_team_member("red", "otto", "viewer")
    assert (await otto.get_model("red-only")).name == "red-only"  # the same session token, no new login
    with pytest.raises(ApiClientError) as caught:
        await otto.update_model("red-only", {"replicas": 1})
    assert caught.value.status == 403
    await admin.remove_team_member("red", "otto")
    with pytest.raises(ApiClientError) as caught:
        await otto.get_model("red-only")
    assert caught.value.status == 404
    await admin.update_user("otto", role="operator")
    assert (await otto.update_model("red-only", {"replicas": 0})).name == "red-only"
    with pytest.raises(ApiClientError) as caught:  # a team that owns models stays
        await admin.delete_team("red")
    assert caught.value.status == 409
    teams_seen = {t.name: t for t in await admin.list_teams()}
    assert {m.username for m in teams_seen["red"].members} == {"mona", "vera"}


async def test_deploy_with_a_team_from_the_cli(server, admin: MaasClient, api_key: str, teams, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from maas_tui.cli.main import app as cli_app

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "300"}
    done = await asyncio.to_thread(CliRunner().invoke, cli_app, [
        "model", "deploy", "blue-cli", "--source", str(tiny_model), "--backend", "llama.cpp", "--replicas", "0",
        "--team", "blue"], env=env)
    assert done.exit_code == 0, done.output
    assert (await admin.get_model("blue-cli")).team == "blue"
    assert [m.name for m in await teams["otto"].list_models()] == ["blue-cli"]
