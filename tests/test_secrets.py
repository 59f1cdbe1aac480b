"""Team secrets: encrypted at rest, named from a spec as {secret: NAME}, given only to the agent that
starts the instance, and never seen in any read path."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server.db import tables
from server.services.secrets import SecretBox, SecretsUnavailable

VALUE = "hf_TopSecretValue_42"


@pytest.fixture
async def mona(server, admin: MaasClient):
    await admin.create_team("red")
    await admin.create_user("mona", "password-123", teams=["red"])
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("mona", "password-123")).token
    async with MaasClient(server.url, token) as client:
        yield client


async def _running(client: MaasClient, model: str) -> bool:
    instances = await client.list_instances(model)
    return bool(instances) and instances[0].state == "running"


async def test_a_secret_reaches_the_backend_and_nothing_else(server, admin: MaasClient, mona: MaasClient, agent,
                                                            tiny_model: Path):
    stored = await mona.set_secret("red", "hf", VALUE)
    assert stored.name == "hf" and stored.team == "red" and VALUE not in stored.model_dump_json()
    key_file = server.config.data_dir / "secrets.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    async with server.db.session() as s:
        row = (await s.execute(select(tables.Secret))).scalar_one()
        assert VALUE not in row.ciphertext and Fernet(key_file.read_bytes().strip()).decrypt(row.ciphertext.encode())

    body = {"name": "sec", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1,
            "env": {"HF_TOKEN": {"secret": "hf"}}}
    with pytest.raises(ApiClientError) as caught:
        await mona.create_model({**body, "env": {"HF_TOKEN": {"secret": "nope"}}})
    assert caught.value.status == 400 and caught.value.details[0]["field"] == "env.HF_TOKEN"
    await mona.create_model(body)
    await eventually(lambda: _running(mona, "sec"), timeout=60, message="the instance running")
    instance = (await mona.list_instances("sec"))[0]
    environ = Path(f"/proc/{instance.pid}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={VALUE}".encode() in environ  # the backend has it...

    # ... and no read path does.
    reads = [await mona.request("GET", "/v2/models/sec"), await mona.request("GET", "/v2/models/sec/describe"),
             await mona.request("GET", "/v2/models/sec/history"), await mona.request("GET", "/v2/instances"),
             await admin.request("GET", "/v2/events", params={"limit": "1000"}),
             await mona.request("GET", "/v2/teams/red/secrets")]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v2/watch", headers={"Authorization": f"Bearer {admin.token}"}) as response:
            reads.append(json.loads(await response.content.readline()))
    assert all(VALUE not in json.dumps(r) for r in reads)
    assert reads[0]["spec"]["env"] == {"HF_TOKEN": {"secret": "hf"}}

    with pytest.raises(ApiClientError) as caught:  # named by a model: kept
        await mona.delete_secret("red", "hf")
    assert caught.value.status == 409
    # Only the worker that runs the instance gets the values.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v2/agent/instances/{instance.id}/secrets",
                            headers={"Authorization": f"Bearer {mona.token}"}) as response:
            assert response.status == 403


async def test_secrets_belong_to_a_team(server, admin: MaasClient, mona: MaasClient):
    await admin.create_team("blue")
    await admin.create_user("otto", "password-123", teams=["blue"])
    async with MaasClient(server.url) as anonymous:
        otto = MaasClient(server.url, (await anonymous.login("otto", "password-123")).token)
    try:
        await mona.set_secret("red", "db", "x")
        with pytest.raises(ApiClientError) as caught:
            await otto.list_secrets("red")
        assert caught.value.status == 404
        with pytest.raises(ApiClientError) as caught:
            await otto.set_secret("red", "db", "overwritten")
        assert caught.value.status == 404
    finally:
        await otto.close()


async def test_a_server_with_another_key_refuses_instead_of_garbling(server, admin: MaasClient, tmp_path: Path):
    async with server.db.session() as s:
        first = await SecretBox.open(s, server.config.data_dir)
        sealed = first.seal("v")
        other = await SecretBox.open(s, tmp_path, environ={"MAAS_SECRETS_KEY": Fernet.generate_key().decode()})
        keyless = await SecretBox.open(s, tmp_path / "empty", environ={})
    assert first.unseal(sealed) == "v"
    for box in (other, keyless):
        with pytest.raises(SecretsUnavailable):
            box.unseal(sealed)
    assert "not the one" in other.problem and "MAAS_SECRETS_KEY" in keyless.problem
