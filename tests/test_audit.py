"""The audit log: every change through /v2, refused ones too, with who, from where and what, and never
a secret; admins read it (REST and `maas audit`); old entries go after the retention period."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server.api.audit import purge, summary
from server.db import tables


def test_the_summary_keeps_no_secret():
    raw = json.dumps({"password": "hunter2", "value": "s3cret", "name": "m", "env": {"A": "plain-secret",
                                                                                     "B": {"secret": "hf"}}}).encode()
    text = summary(raw, "replace=1")
    assert "hunter2" not in text and "s3cret" not in text and "plain-secret" not in text
    assert text.startswith("?replace=1") and '"B":{"secret":"hf"}' in text and '"name":"m"' in text
    assert summary(b"\xff\xfe", "") == "<2 bytes, not JSON>"


async def test_changes_are_audited_and_only_admins_read_them(server, admin: MaasClient, api_key: str,
                                                              tiny_model: Path, tmp_path: Path):
    await admin.create_user("mona", "password-123")
    async with MaasClient(server.url) as anonymous:
        with pytest.raises(ApiClientError):
            await anonymous.login("mona", "wrong-password")
        token = (await anonymous.login("mona", "password-123")).token
    async with MaasClient(server.url, token) as mona:
        await mona.create_model({"name": "m1", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0,
                                 "env": {"HF_TOKEN": "hf_plain_value"}})
        with pytest.raises(ApiClientError):
            await mona.request("DELETE", "/v2/workers/nowhere")  # refused: audited all the same
        with pytest.raises(ApiClientError) as caught:
            await mona.audit()
        assert caught.value.status == 403
        await mona.list_models()  # reads are not changes

    entries = await admin.audit(limit=1000)
    seen = [(e.actor, e.method, e.path, e.status) for e in reversed(entries)]
    assert ("mona (login)", "POST", "/v2/auth/login", 401) in seen
    assert ("mona (login)", "POST", "/v2/auth/login", 200) in seen
    assert ("mona", "POST", "/v2/models", 201) in seen
    assert ("mona", "DELETE", "/v2/workers/nowhere", 403) in seen
    assert not any(method == "GET" for _, method, _, _ in seen)
    assert all(e.address == "127.0.0.1" for e in entries)
    text = json.dumps([e.model_dump(mode="json") for e in entries])
    assert "hf_plain_value" not in text and "password-123" not in text and "wrong-password" not in text
    assert [e.path for e in await admin.audit(actor="mona")][-1] == "/v2/models"

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "300"}
    shown = await asyncio.to_thread(CliRunner().invoke, cli_app, ["audit", "--actor", "mona"], env=env)
    assert shown.exit_code == 0 and "POST /v2/models" in shown.output, shown.output


async def test_old_entries_go_after_the_retention_period(server):
    old = datetime.now(UTC) - timedelta(days=server.config.audit_retention_days + 1)
    async with server.db.session() as s:
        s.add(tables.AuditEntry(actor="old", method="POST", path="/v2/x", status=200, at=old))
        s.add(tables.AuditEntry(actor="new", method="POST", path="/v2/x", status=200))
        await s.commit()
        await purge(s, server.config.audit_retention_days)
        await s.commit()
        actors = (await s.execute(select(tables.AuditEntry.actor))).scalars().all()
    assert "old" not in actors and "new" in actors
