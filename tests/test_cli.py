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


async def test_get_prints_documents_that_apply_takes_back(server, admin: MaasClient, api_key: str, cli,
                                                          tmp_path: Path, tiny_model: Path) -> None:
    """`maas model get NAME -o yaml|json | maas apply -f -` works unchanged (it used to fail on `name`)."""
    import yaml

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key}
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0,
                              "context_length": 512, "args": ["--threads", "1"]})
    for fmt, parse in (("yaml", yaml.safe_load), ("json", json.loads)):
        result = await cli("model", "get", "tiny", "-o", fmt, env=env)
        assert result.exit_code == 0, result.output
        document = parse(result.stdout)
        assert document["kind"] == "Model" and document["metadata"]["name"] == "tiny"
        assert document["spec"]["replicas"] == 0 and document["spec"]["source"] == str(tiny_model)
        assert document["status"]["generation"] == 1 and document["status"]["state"] == "active"
        result = await cli("apply", "-f", "-", "-o", "json", env=env, input=result.stdout)
        assert result.exit_code == 0, result.output
        assert [(r["name"], r["action"]) for r in json.loads(result.stdout)["items"]] == [("tiny", "unchanged")]

    # Edited, the same document rolls the model out; its status is ignored.
    document = yaml.safe_load((await cli("model", "get", "tiny", "-o", "yaml", env=env)).stdout)
    document["spec"]["context_length"] = 1024
    document["status"] = {"generation": 99}
    result = await cli("apply", "-f", "-", env=env, input=yaml.safe_dump(document))
    assert result.exit_code == 0 and "model/tiny updated, rollout started" in result.output, result.output
    model = await admin.get_model("tiny")
    assert model.spec.context_length == 1024 and model.generation == 2
    # The team is metadata (like a namespace): kept by the round trip, and a model does not move teams.
    assert document["metadata"].get("team") == model.team
    document["metadata"]["team"] = "elsewhere"
    result = await cli("apply", "-f", "-", env=env, input=yaml.safe_dump(document))
    assert result.exit_code == 1 and "does not change teams" in result.output, result.output

    # Other kinds print documents too; apply refuses the kinds it does not manage, with a message.
    document = yaml.safe_load((await cli("key", "get", "tests", "-o", "yaml", env=env)).stdout)
    assert document["kind"] == "ApiKey" and document["metadata"]["name"] == "tests" and "key" not in document["spec"]
    result = await cli("apply", "-f", "-", env=env, input=yaml.safe_dump(document))
    assert result.exit_code == 1 and "kind 'ApiKey' is not supported" in result.output, result.output

    # A custom backend: `backend get -o yaml` is what `backend add -f` takes back; describe shows it whole.
    definition = _write(tmp_path / "echo.yaml", "name: echo\ndescription: an echo\n"
                        "command: [python3, -m, http.server, '{port}']\nhealth_path: /\n")
    assert (await cli("backend", "add", "-f", str(definition), env=env)).exit_code == 0
    document = yaml.safe_load((await cli("backend", "get", "echo", "-o", "yaml", env=env)).stdout)
    assert document["kind"] == "Backend" and document["metadata"]["name"] == "echo"
    assert document["spec"]["command"] == ["python3", "-m", "http.server", "{port}"]
    document["spec"]["description"] = "an echo, edited"
    result = await cli("backend", "add", "-f", "-", "--replace", env=env, input=yaml.safe_dump(document))
    assert result.exit_code == 0, result.output
    assert (await admin.get_backend("echo")).description == "an echo, edited"
    result = await cli("backend", "describe", "custom:echo", env=env)
    assert result.exit_code == 0 and "python3 -m http.server {port}" in result.output and "Health" in result.output


async def test_apply_validates_every_document_before_writing(server, admin: MaasClient, api_key: str, cli,
                                                             tmp_path: Path, tiny_model: Path) -> None:
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key}
    good = f"name: alpha\nsource: {tiny_model}\nbackend: llama.cpp\nreplicas: 0\n"
    # The server refuses the second model (a source outside the model roots): nothing is written, not even alpha.
    outside = _write(tmp_path / "outside.yaml", good + "---\nname: beta\nsource: /srv/nowhere/x.gguf\n"
                     "backend: llama.cpp\nreplicas: 0\n")
    result = await cli("apply", "-f", str(outside), env=env)
    assert result.exit_code == 1 and "beta" in result.output and "nothing was applied" in result.output, result.output
    assert await admin.list_models() == []
    # Local checks fail the whole file too: strict types (no "2" for an integer), duplicate keys.
    for text, problem in ((good + "---\nname: gamma\nsource: /x.gguf\nbackend: llama.cpp\nreplicas: '2'\n",
                           "gamma: replicas"),
                          (good + "---\nname: delta\nname: delta2\nsource: /x.gguf\nbackend: llama.cpp\n",
                           "the key 'name' is given twice")):
        result = await cli("apply", "-f", str(_write(tmp_path / "bad.yaml", text)), env=env)
        assert result.exit_code == 1 and problem in result.output, result.output
        assert "Traceback" not in result.output
    assert await admin.list_models() == []
    result = await cli("apply", "-f", str(_write(tmp_path / "good.yaml", good)), env=env)
    assert result.exit_code == 0, result.output
    assert [m.name for m in await admin.list_models()] == ["alpha"]


async def test_hostile_files_urls_ports_and_markup(server, api_key: str, cli, tmp_path: Path) -> None:
    """Bad input is refused with one line, never a traceback: binary, huge or non-UTF-8 files, bad URLs and
    ports; what the server says is printed literally (no Rich markup)."""
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key}
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\n\x00\x01\x02")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * (5 * 1024 * 1024))
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    aliases = _write(tmp_path / "laughs.yaml", "\n".join(laughs) + "\n")  # 10**10 values once expanded
    unhashable = _write(tmp_path / "unhashable.yaml", "{[1]: 2}\n")
    for path, message, code in ((binary, "is a binary file", 1), (latin, "is not UTF-8 text", 1),
                                (aliases, "expands to more than", 1), (unhashable, "unhashable key", 1),
                                (huge, "larger than 4 MiB", 1), (Path("/dev/zero"), "larger than 4 MiB", 1),
                                (tmp_path, "cannot read", 2)):
        for command in (("apply", "-f", str(path)), ("backend", "add", "-f", str(path))):
            result = await cli(*command, env=env)
            assert result.exit_code == code and message in result.output, (command, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for text in ("kind: Model\nmetadata: oops\nspec: {source: /x.gguf}\n", "kind: Model\nmetadata: {name: a}\nspec: [1]\n"):
        result = await cli("apply", "-f", "-", env=env, input=text)
        assert result.exit_code == 1 and "metadata and spec must be mappings" in result.output, result.output
    result = await cli("user", "add-key", "admin", "--key-file", "/dev/zero", env=env)
    assert result.exit_code == 1 and "larger than" in result.output, result.output

    for args in (("login", "--server", "notaurl", "--api-key", "k"), ("login", "--server", "http://host:99999", "--api-key", "k"),
                 ("context", "add", "x", "--server", "ftp://host"), ("agent", "--server-url", "notaurl", "--token", "t"),
                 ("start", "--advertise-url", "http://"), ("worker", "add", "root@h", "--token", "t", "--server-url", "h:1")):
        result = await cli(*args)
        assert result.exit_code == 2 and "server URL" in result.output, (args, result.output)
    result = await cli("model", "list", env={"MAAS_SERVER": "notaurl"})
    assert result.exit_code == 2 and "server URL" in result.output, result.output
    for args in (("start", "--port", "99999"), ("start", "--ssh-port", "0"), ("ssh", "serve", "--port", "70000"),
                 ("agent", "--server-url", "http://127.0.0.1:1", "--token", "t", "--port", "70000"),
                 ("worker", "add", "root@host:70000", "--token", "t")):
        result = await cli(*args)
        assert result.exit_code == 2 and ("Invalid value" in result.output or "port" in result.output), (args, result.output)

    # What the server stores and says is printed as typed, not read as Rich markup (a table cell, a describe
    # page, an error message).
    definition = _write(tmp_path / "backend.yaml", "name: echo\ndescription: '[red]boom[/red] [bold]x'\n"
                        "command: [python3, -m, http.server, '{port}']\n")
    result = await cli("backend", "add", "-f", str(definition), env=env)
    assert result.exit_code == 0 and "[red]boom[/red] [bold]x" in result.output, result.output
    assert "[red]boom[/red] [bold]x" in (await cli("backend", "list", env=env)).output
    result = await cli("backend", "add", "-f", str(definition), env=env)  # registered already: refused
    assert result.exit_code == 1 and "echo" in result.output, result.output
    result = await cli("key", "describe", "[red]nope[/red]", env=env)
    assert result.exit_code == 1 and "API key '[red]nope[/red]' not found" in result.output, result.output


async def test_describe_every_kind_with_the_tuis_columns(server, admin: MaasClient, api_key: str, agent, cli,
                                                         tiny_model: Path) -> None:
    """`describe` exists for every kind, and list tables have exactly the TUI's columns (one renderer each)."""
    from maas_tui.render import instances as render_instances, models as render_models, workers as render_workers
    from maas_tui.render.claims import claim_cell

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key}
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1,
                              "context_length": 512})
    deadline = asyncio.get_running_loop().time() + 60
    while not (placed := [i for i in await admin.list_instances("tiny") if i.claim is not None]):
        assert asyncio.get_running_loop().time() < deadline, "no instance was placed"
        await asyncio.sleep(0.2)
    instance = placed[0]

    def headers(output: str) -> list[str]:
        return output.splitlines()[0].split()

    for args, columns in ((("model", "list"), render_models.COLUMNS),
                          (("model", "list", "-o", "wide"), render_models.COLUMNS + render_models.WIDE_COLUMNS),
                          (("instance", "list", "-o", "wide"), render_instances.COLUMNS + render_instances.WIDE_COLUMNS),
                          (("worker", "list", "-o", "wide"), render_workers.COLUMNS + render_workers.WIDE_COLUMNS)):
        result = await cli(*args, env=env)
        assert result.exit_code == 0, result.output
        assert headers(result.output) == " ".join(label for label, _ in columns).split(), args
    listing = (await cli("instance", "list", env=env)).output
    assert claim_cell(instance.claim) in listing  # the TUI's PLACEMENT cell, word for word

    for args, expected in ((("model", "describe", "tiny"), ["Replicas", "Rollout", "Instances", instance.name, "Events"]),
                           (("instance", "describe", instance.name), ["Claim", "CPU,", "worker-1", "Events"]),
                           (("worker", "describe", "worker-1"), ["Heartbeat", "GPUs", "Instances", instance.name]),
                           (("key", "describe", "tests"), ["Prefix", "Scopes", "never"])):
        result = await cli(*args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert all(word in result.output for word in expected), (args, result.output)
    assert (await cli("worker", "describe", "nowhere", env=env)).exit_code == 1
