"""The CLI for scripts against a real server: contexts, exit codes, JSON output, `maas apply`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maas_tui.cli.main import app
from maas_tui.client import MaasClient


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `maas ...` in a thread (it runs its own event loop) with its own config file."""
    monkeypatch.setenv("MAAS_CONFIG", str(tmp_path / "maas-config.json"))
    for name in ("MAAS_SERVER", "MAAS_API_KEY", "MAAS_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    async def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env, input=input)
    return invoke


async def test_contexts_exit_codes_and_json(server, admin: MaasClient, api_key: str, cli, tmp_path: Path) -> None:
    # Nothing configured: a failure (1) with a hint.
    result = await cli("model", "list")
    assert result.exit_code == 1 and "no server configured" in result.output
    # Usage errors are 2: an unknown option, a missing argument, an unknown context.
    assert (await cli("model", "list", "--bogus")).exit_code == 2
    assert (await cli("model", "get")).exit_code == 2
    assert (await cli("--context", "nowhere", "model", "list")).exit_code == 2

    # MAAS_SERVER / MAAS_API_KEY work with no config file.
    result = await cli("model", "list", "-o", "json", env={"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"items": []}

    result = await cli("context", "add", "local", "--server", server.url, "--api-key", api_key, "--use")
    assert result.exit_code == 0, result.output
    result = await cli("context", "add", "other", "--server", "http://127.0.0.1:1")  # no credentials, unreachable
    assert result.exit_code == 0, result.output
    listing = json.loads((await cli("context", "list", "-o", "json")).stdout)["items"]
    assert [(c["name"], c["current"]) for c in listing] == [("local", True), ("other", False)]
    config = json.loads((tmp_path / "maas-config.json").read_text())
    assert config["current_context"] == "local" and config["contexts"]["local"]["token"] == api_key

    result = await cli("worker", "list", "-o", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"items": []}
    # --context picks another one for one command; a server that does not answer is a failure.
    result = await cli("--context", "other", "model", "list")
    assert result.exit_code == 1 and "cannot reach" in result.output
    # A refusal from the server is a failure too.
    result = await cli("model", "get", "missing")
    assert result.exit_code == 1 and "not found" in result.output
    result = await cli("context", "use", "other")
    assert result.exit_code == 0
    assert (await cli("context", "use", "nowhere")).exit_code == 2
    result = await cli("--context", "local", "version")
    assert result.exit_code == 0 and "server: maas" in result.output

    # `maas login` stores into the context named with --context.
    password = server.admin_password_file.read_text().strip()
    result = await cli("--context", "admin-ctx", "login", "--server", server.url, "--username", "admin",
                       "--password", password)
    assert result.exit_code == 0, result.output
    result = await cli("--context", "admin-ctx", "user", "list", "-o", "json")
    assert result.exit_code == 0 and [u["username"] for u in json.loads(result.stdout)["items"]] == ["admin"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_apply_creates_updates_and_is_idempotent(server, admin: MaasClient, api_key: str, cli, tmp_path: Path,
                                                       tiny_model: Path) -> None:
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key}
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    manifest = _write(models / "models.yaml", """\
name: alpha
source: ./tiny.gguf
backend: llama.cpp
replicas: 0
---
kind: Model
metadata: {name: beta}
spec:
  source: ./tiny.gguf
  backend: llama.cpp
  replicas: 0
  context_length: 512
""")
    result = await cli("apply", "-f", str(manifest), "--dry-run", "-o", "json", env=env)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["items"]
    assert [(p["name"], p["action"], p["dry_run"]) for p in plan] == [("alpha", "create", True), ("beta", "create", True)]
    assert await admin.list_models() == []  # a dry run changes nothing

    result = await cli("apply", "-f", str(manifest), env=env)
    assert result.exit_code == 0, result.output
    assert "model/alpha created" in result.output and "model/beta created" in result.output
    beta = await admin.get_model("beta")
    assert beta.spec.context_length == 512 and beta.spec.source == str(models / "tiny.gguf")

    result = await cli("apply", "-f", str(manifest), "-o", "json", env=env)  # idempotent
    assert [p["action"] for p in json.loads(result.stdout)["items"]] == ["unchanged", "unchanged"]
    assert (await admin.get_model("beta")).generation == beta.generation

    changed = _write(models / "models.yaml", manifest.read_text().replace("context_length: 512", "context_length: 1024")
                     .replace("replicas: 0\n---", "replicas: 0\nmax_surge: 2\n---"))
    result = await cli("apply", "-f", str(changed), "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    assert "model/beta would be updated (rollout)" in result.output and "context_length: 512 -> 1024" in result.output
    assert "max_surge: 1 -> 2" in result.output
    assert (await admin.get_model("beta")).spec.context_length == 512
    result = await cli("apply", "-f", str(changed), env=env)
    assert result.exit_code == 0, result.output
    after = await admin.get_model("beta")
    assert after.spec.context_length == 1024 and after.generation == beta.generation + 1  # a rollout
    assert (await admin.get_model("alpha")).max_surge == 2
    assert "unchanged" in (await cli("apply", "-f", str(changed), env=env)).output

    # An invalid document fails before anything is sent; a missing file is a usage error.
    bad = _write(tmp_path / "bad.yaml", "name: gamma\nbackend: llama.cpp\nreplicas: -1\n")
    result = await cli("apply", "-f", str(bad), env=env)
    assert result.exit_code == 1 and "gamma" in result.output
    assert (await cli("apply", "-f", str(tmp_path / "absent.yaml"), env=env)).exit_code == 2
    assert [m.name for m in await admin.list_models()] == ["alpha", "beta"]


async def test_user_ssh_keys_from_the_cli(server, admin: MaasClient, cli, tmp_path: Path) -> None:
    import asyncssh

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": admin.token}
    key = asyncssh.generate_private_key("ssh-ed25519", comment="ops@laptop")
    pub = _write(tmp_path / "id_ed25519.pub", key.export_public_key().decode())
    result = await cli("user", "add-key", "admin", "--key-file", str(pub), "-o", "json", env=env)
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert added["fingerprint"] == key.get_fingerprint("sha256") and added["name"] == "ops@laptop"
    listed = json.loads((await cli("user", "keys", "admin", "-o", "json", env=env)).stdout)["items"]
    assert [k["fingerprint"] for k in listed] == [added["fingerprint"]]
    assert (await cli("user", "add-key", "nobody", "--key-file", str(pub), env=env)).exit_code == 1
    assert (await cli("user", "add-key", "admin", "--key-file", str(tmp_path / "none.pub"), env=env)).exit_code == 2
    result = await cli("user", "remove-key", "admin", added["fingerprint"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((await cli("user", "keys", "admin", "-o", "json", env=env)).stdout) == {"items": []}
