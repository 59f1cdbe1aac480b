"""Admins can clean up: every key and session listed and revocable, users disabled and deleted at once;
new keys are for applications (inference); failed logins are throttled; expired sessions purged."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server.db import tables


async def _status(server, token: str, path: str = "/v2/models") -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + path, headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status


async def _login(server, username: str, password: str = "password-123") -> str:
    async with MaasClient(server.url) as anonymous:
        return (await anonymous.login(username, password)).token


@pytest.fixture
async def alice(server, admin: MaasClient):
    await admin.create_user("alice", "password-123")
    return await _login(server, "alice")


async def test_new_keys_are_inference_keys_unless_asked(server, admin: MaasClient):
    app_key = await admin.create_key("app")
    assert app_key.scopes == ["inference"]
    assert await _status(server, app_key.key, "/v1/models") == 200
    assert await _status(server, app_key.key) == 403
    ops_key = await admin.create_key("ops", scopes=["management", "inference"])
    assert await _status(server, ops_key.key) == 200


async def test_admins_list_and_revoke_anyones_keys_and_sessions(server, admin: MaasClient, alice: str):
    async with MaasClient(server.url, alice) as client:
        key = await client.create_key("alices-app")
        with pytest.raises(ApiClientError) as caught:
            await client.list_keys(all_users=True)
        assert caught.value.status == 403
        with pytest.raises(ApiClientError) as caught:
            await client.delete_key("tests", user="admin")
        assert caught.value.status == 403
        mine = await client.list_sessions()
        assert [s.username for s in mine] == ["alice"] and mine[0].kind == "login"
        with pytest.raises(ApiClientError) as caught:  # someone else's session does not exist for alice
            await client.revoke_session((await admin.list_sessions())[0].prefix)
        assert caught.value.status == 404

    everyone = await admin.list_keys(all_users=True)
    assert ("alice", "alices-app") in {(k.owner, k.name) for k in everyone}
    await admin.delete_key("alices-app", user="alice")
    assert await _status(server, key.key, "/v1/models") == 401  # at once

    sessions = {s.username: s for s in await admin.list_sessions(all_users=True)}
    assert set(sessions) == {"admin", "alice"}
    await admin.revoke_session(sessions["alice"].prefix)
    assert await _status(server, alice) == 401


async def test_a_disabled_or_deleted_user_stops_at_once(server, admin: MaasClient, alice: str):
    async with MaasClient(server.url, alice) as client:
        key = (await client.create_key("k", scopes=["management", "inference"])).key
    assert await _status(server, alice) == 200 and await _status(server, key) == 200
    disabled = await admin.update_user("alice", disabled=True)
    assert disabled.disabled
    assert await _status(server, alice) == 401 and await _status(server, key) == 401
    with pytest.raises(ApiClientError) as caught:
        await _login(server, "alice")
    assert caught.value.status == 403 and "disabled" in caught.value.message
    await admin.update_user("alice", disabled=False)
    assert await _status(server, key) == 200
    with pytest.raises(ApiClientError) as caught:
        await admin.update_user("admin", disabled=True)
    assert caught.value.status == 409
    await admin.delete_user("alice")
    assert await _status(server, key) == 401
    assert "alice" not in {u.username for u in await admin.list_users()}


async def test_failed_logins_are_throttled_per_user_and_expired_sessions_purged(server, admin: MaasClient, alice):
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.post(f"{server.url}/v2/auth/login", json={"username": "alice", "password": "wrong"}) as r:
                assert r.status == 401
        async with http.post(f"{server.url}/v2/auth/login",
                             json={"username": "alice", "password": "password-123"}) as r:
            assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
            assert (await r.json())["error"]["code"] == "too_many_attempts"
        for _ in range(5):  # an unknown user costs the same and is throttled the same
            async with http.post(f"{server.url}/v2/auth/login", json={"username": "ghost", "password": "x"}) as r:
                assert r.status == 401
        async with http.post(f"{server.url}/v2/auth/login", json={"username": "ghost", "password": "x"}) as r:
            assert r.status == 429
    # Another user is not held up by alice's throttle (the address limit is higher).
    assert await _login(server, "admin", server.admin_password_file.read_text().strip())

    async with server.db.session() as s:
        user_id = (await s.execute(select(tables.User.id).where(tables.User.username == "admin"))).scalar_one()
        s.add(tables.ApiKey(user_id=user_id, kind="session", name="session-old", prefix="oldprefix",
                            secret_hash="x", expires_at=datetime.now(UTC) - timedelta(days=1)))
        await s.commit()
    await _login(server, "admin", server.admin_password_file.read_text().strip())
    async with server.db.session() as s:
        assert (await s.execute(select(tables.ApiKey).where(tables.ApiKey.prefix == "oldprefix"))).first() is None


async def test_session_and_user_commands(server, admin: MaasClient, api_key: str, alice: str, tmp_path: Path):
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "300"}

    def run(*args: str):
        return CliRunner().invoke(cli_app, list(args), env=env)

    listed = await asyncio.to_thread(run, "session", "list", "--all")
    assert listed.exit_code == 0 and "alice" in listed.output, listed.output
    prefix = next(s.prefix for s in await admin.list_sessions(all_users=True) if s.username == "alice")
    revoked = await asyncio.to_thread(run, "session", "revoke", prefix)
    assert revoked.exit_code == 0 and await _status(server, alice) == 401
    keys = await asyncio.to_thread(run, "key", "list", "--all")
    assert keys.exit_code == 0 and "admin:" in keys.output and "tests" in keys.output, keys.output
    disabled = await asyncio.to_thread(run, "user", "disable", "alice")
    assert disabled.exit_code == 0 and "alice" in disabled.output
    deleted = await asyncio.to_thread(run, "user", "delete", "alice")
    assert deleted.exit_code == 0, deleted.output
