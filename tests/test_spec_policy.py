"""No model spec reaches a shell: env and args allow-listed per backend, bind flags refused, sources
under the model roots, placeholders never shell text; checked by the server and again by the agent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.agent import Agent, AgentConfig
from agent.backends import BackendError, LaunchContext, build_launch
from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server.db import tables
from server.schemas import BackendDefinition, InstanceOut, ModelSpec
from server.schemas.backend_traits import (args_problems, env_name_problem, source_problem, spec_problems,
                                           template_problem)
from tiny_gguf import write_tiny_gguf

# --- the rules, as pure functions ------------------------------------------------------------


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP",
                                  "BROWSER", "PATH", "BASH_ENV", "NODE_OPTIONS", "GCONV_PATH", "MY_PRELOAD",
                                  "CUDA_VISIBLE_DEVICES", "LLAMA_ARG_HOST", "DYLD_INSERT_LIBRARIES", "MAAS_TOKEN",
                                  "ld_preload", "A-B", "1X", ""])
def test_loader_interpreter_device_and_bind_variables_are_refused_for_everyone(name: str):
    assert env_name_problem(name) is not None


@pytest.mark.parametrize("name", ["HF_TOKEN", "OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL", "MY_SETTING"])
def test_ordinary_variables_pass_the_rule_for_everyone(name: str):
    assert env_name_problem(name) is None


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--hos", "0.0.0.0"], ["--port", "1"],
                                  ["--api-key", "x"], ["--model", "/etc/shadow"], ["-m", "/etc/shadow"],
                                  ["--served-model-name", "other"], ["--alias=other"], ["--uds", "/tmp/s"]])
def test_bind_and_identity_flags_are_refused_for_admins_too(args: list[str]):
    assert args_problems(args, None)


def test_allow_list_takes_flags_and_their_values_only():
    allowed = frozenset({"--threads", "--seed", "--embeddings"})
    assert args_problems(["--threads", "2", "--seed", "-1", "--embeddings"], allowed) == []
    assert args_problems(["--seed=-1"], allowed) == []
    refused = args_problems(["positional", "--threads", "2", "--trust-remote-code"], allowed)
    assert [p.field for p in refused] == ["args[0]", "args[3]"]
    assert "only flags" in refused[0].message and "--trust-remote-code is not allowed" in refused[1].message


def _spec(**fields) -> ModelSpec:
    return ModelSpec(**{"source": "/models/m.gguf", "backend": "llama.cpp", **fields})


def test_spec_problems_name_each_field():
    spec = _spec(env={"HF_TOKEN": "t", "FOO": "1", "LD_PRELOAD": "/x.so"}, args=["--threads", "2", "--host", "::"],
                 backend_version="latest;rm -rf /")
    problems = spec_problems(spec, spec_bytes=100, allowed_env=frozenset({"HF_TOKEN"}),
                             allowed_args=frozenset({"--threads"}))
    assert {p.field for p in problems} == {"env.FOO", "env.LD_PRELOAD", "args[2]", "backend_version"}
    admin = spec_problems(spec, spec_bytes=100, allowed_env=None, allowed_args=None)
    assert {p.field for p in admin} == {"env.LD_PRELOAD", "args[2]", "backend_version"}


def test_spec_size_caps():
    assert spec_problems(_spec(args=["--seed"] * 300), spec_bytes=10, allowed_env=None, allowed_args=None)[0].field == "args"
    assert spec_problems(_spec(env={"V": "x" * 20_000}), spec_bytes=10, allowed_env=None,
                         allowed_args=None)[0].field == "env.V"
    assert spec_problems(_spec(), spec_bytes=70_000, allowed_env=None, allowed_args=None)[0].field == "spec"
    assert spec_problems(_spec(source="--host=0.0.0.0"), spec_bytes=10, allowed_env=None,
                         allowed_args=None)[0].field == "source"


def test_local_sources_lie_under_a_root_and_have_the_backends_file_type(tmp_path: Path):
    root = tmp_path / "models"
    root.mkdir()
    gguf = write_tiny_gguf(root / "tiny.gguf", seed=0)
    (root / "fake.gguf").write_text("not a model")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    (root / "escape.gguf").symlink_to("/etc/passwd")
    roots = [str(root)]
    assert source_problem(str(gguf), roots, "gguf", must_exist=True) is None
    assert source_problem(str(root / "hf"), roots, "hf", must_exist=True) is None
    assert source_problem(str(gguf), roots, "hf_or_gguf", must_exist=True) is None
    assert "not under a model root" in source_problem("/etc/shadow", roots, "any", must_exist=False)
    assert "not under a model root" in source_problem(str(root / "escape.gguf"), roots, "gguf", must_exist=True)
    assert "normalised" in source_problem(f"{root}/../../etc/shadow", roots, "any", must_exist=False)
    assert "no GGUF header" in source_problem(str(root / "fake.gguf"), roots, "gguf", must_exist=True)
    assert ".gguf file" in source_problem(str(root / "hf"), roots, "gguf", must_exist=True)
    assert "config.json" in source_problem(str(root), [str(tmp_path)], "hf", must_exist=True)
    assert "does not exist" in source_problem(str(root / "gone.gguf"), roots, "gguf", must_exist=True)
    assert source_problem(str(root / "later.gguf"), roots, "gguf", must_exist=False) is None  # on a worker only


@pytest.mark.parametrize("command", [
    ["sh", "-c", "server --model {model_path}"],
    ["/bin/bash", "-lc", "exec server {model_name}"],
    ["env", "A=1", "sh", "-c", "run {model_path}"],
    ["python3", "-c", "import os; os.system('{model_path}')"],
    ["perl", "-e", "system('{model_name}')"],
])
def test_templates_that_put_placeholders_into_shell_code_are_refused(command: list[str]):
    assert template_problem(command) is not None
    with pytest.raises(ValueError, match="as code with a placeholder"):
        BackendDefinition(name="evil", command=command)


@pytest.mark.parametrize("command", [
    ["sh", "-c", 'exec server --model "$1"', "sh", "{model_path}"],
    ["server", "--model={model_path}", "--port", "{port}"],
    ["python3", "-m", "server", "{model_path}"],
])
def test_placeholders_as_argv_items_are_fine(command: list[str]):
    assert template_problem(command) is None


def test_the_agent_refuses_what_no_spec_may_do_even_when_the_server_stored_it():
    instance = InstanceOut.model_construct(
        id=1, name="m-1", model_name="m", spec=_spec(env={"BROWSER": "sh -c id #%s"}), claim=None)
    with pytest.raises(BackendError, match="env.BROWSER"):
        build_launch(instance, LaunchContext(host="127.0.0.1", port=1))
    custom = InstanceOut.model_construct(id=2, name="c-1", model_name="c",
                                         spec=_spec(backend="custom:evil"), claim=None)
    stored = BackendDefinition.model_construct(name="evil", command=["sh", "-c", "x {model_path}"], env={}, image=None,
                                               health_path="/health", metrics_path=None, metrics={})
    with pytest.raises(BackendError, match="placeholder"):
        build_launch(custom, LaunchContext(host="127.0.0.1", port=1, custom=stored))


# --- through the real server and agent -------------------------------------------------------


@pytest.fixture
async def member(server, admin: MaasClient):
    """An ordinary user (not an admin) with a management key."""
    await admin.create_user("alice", "alice-password-1")
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("alice", "alice-password-1")).token
    async with MaasClient(server.url, token) as client:
        yield client


async def _refused(client: MaasClient, body: dict, field: str) -> ApiClientError:
    with pytest.raises(ApiClientError) as caught:
        await client.create_model(body)
    error = caught.value
    assert error.status == 400 and error.code == "spec_refused", (error.status, error.code, error.message)
    assert any(d["field"] == field for d in error.details), error.details
    return error


async def test_the_reported_escapes_are_refused_with_a_400_naming_the_field(server, admin: MaasClient, member,
                                                                             tiny_model: Path):
    base = {"name": "m", "source": str(tiny_model), "backend": "llama.cpp"}
    # The report: PYTHONWARNINGS + BROWSER ran `id` as root on the worker; LD_PRELOAD and PYTHONPATH too.
    await _refused(member, {**base, "env": {"PYTHONWARNINGS": "ignore::antigravity.x",
                                            "BROWSER": 'sh -c "id > /tmp/x" #%s'}}, "env.BROWSER")
    for client in (member, admin):  # what nobody may do binds admins too
        await _refused(client, {**base, "env": {"LD_PRELOAD": "/tmp/evil.so"}}, "env.LD_PRELOAD")
        await _refused(client, {**base, "env": {"PYTHONPATH": "/tmp/evil"}}, "env.PYTHONPATH")
        await _refused(client, {**base, "args": ["--host", "0.0.0.0"]}, "args[0]")
        await _refused(client, {**base, "source": "/etc/shadow"}, "source")
        await _refused(client, {**base, "source": str(tiny_model.parent / ".." / "etc" / "x.gguf")}, "source")
    # Beyond the allow-list: only ordinary users are held to it.
    await _refused(member, {**base, "args": ["--ctx-size", "999999"]}, "args[0]")
    await _refused(member, {**base, "env": {"SOME_FLAG": "1"}}, "env.SOME_FLAG")
    await admin.create_model({**base, "name": "admin-m", "env": {"SOME_FLAG": "1"}, "replicas": 0})
    # The dry run and edits are checked alike.
    with pytest.raises(ApiClientError) as caught:
        await member.request("POST", "/v2/models/evaluate", json_body={**base, "env": {"LD_AUDIT": "x"}})
    assert caught.value.status == 400
    await member.create_model({**base, "name": "ok", "env": {"HF_TOKEN": "t"}, "args": ["--threads", "1"],
                               "replicas": 0})
    with pytest.raises(ApiClientError) as caught:
        await member.request("PATCH", "/v2/models/ok", json_body={"env": {"BASH_ENV": "/tmp/x"}})
    assert caught.value.status == 400 and caught.value.details[0]["field"] == "env.BASH_ENV"
    # Size caps: 10,000 args, a 600 KB env value (under the 1 MiB body limit of /v2).
    await _refused(admin, {**base, "args": ["--threads"] * 10_000}, "args")
    await _refused(admin, {**base, "env": {"BIG": "x" * 600_000}}, "env.BIG")


async def test_an_admin_opens_a_backend_up_for_ordinary_users(server, admin: MaasClient, member, tiny_model: Path):
    body = {"name": "m", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0,
            "env": {"LLAMA_LOG_COLORS": "0"}, "args": ["--ctx-size", "512"]}
    await _refused(member, body, "env.LLAMA_LOG_COLORS")
    with pytest.raises(ApiClientError) as caught:  # members cannot open it up themselves
        await member.set_backend_allow_list("llama.cpp", ["LLAMA_LOG_COLORS"], [])
    assert caught.value.status == 403
    with pytest.raises(ApiClientError) as caught:  # nor can an admin allow what nobody may pass
        await admin.set_backend_allow_list("llama.cpp", ["LD_PRELOAD"], [])
    assert caught.value.status in (400, 422)
    await admin.set_backend_allow_list("llama.cpp", ["LLAMA_LOG_COLORS"], ["--ctx-size"])
    listed = {b.name: b for b in await member.list_backends()}
    assert "LLAMA_LOG_COLORS" in listed["llama.cpp"].allowed_env and "--ctx-size" in listed["llama.cpp"].allowed_args
    assert "--threads" in listed["llama.cpp"].allowed_args and "LLAMA_LOG_COLORS" not in listed["vllm"].allowed_env
    assert (await member.create_model(body)).name == "m"


async def test_shell_templates_are_refused_at_registration(server, admin: MaasClient):
    with pytest.raises(ApiClientError) as caught:
        await admin.add_backend({"name": "evil", "command": ["sh", "-c", "serve --model {model_path} --port {port}"]})
    assert caught.value.status in (400, 422) and "placeholder" in caught.value.message


async def test_the_agent_refuses_a_spec_written_past_the_api_and_nothing_runs(server, admin: MaasClient, agent,
                                                                             tiny_model: Path, tmp_path: Path):
    """A spec stored before these rules (or by hand) with the reported BROWSER trick: the agent stops
    it before any process starts, so the marker file never appears."""
    marker = tmp_path / "pwned"
    await admin.create_model({"name": "old", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0})
    async with server.db.session() as s:
        model = (await s.execute(select(tables.Model).where(tables.Model.name == "old"))).scalar_one()
        model.spec = {**model.spec, "env": {"PYTHONWARNINGS": "ignore::antigravity.x",
                                            "BROWSER": f'sh -c "id > {marker}" #%s'}}
        await s.commit()
    await admin.request("PATCH", "/v2/models/old", json_body={"replicas": 1})

    async def refused() -> bool:
        instances = await admin.list_instances("old")
        return bool(instances) and instances[0].state == "error"

    await eventually(refused, message="the agent refusing the stored spec")
    instance = (await admin.list_instances("old"))[0]
    assert "env.BROWSER" in instance.state_message and "refused" in instance.state_message
    await asyncio.sleep(1)
    assert not marker.exists()


async def test_the_agent_serves_only_from_its_own_model_roots(server, admin: MaasClient, tmp_path: Path):
    """The server's roots (the tests': /tmp) let the spec in; this worker's roots do not hold the file."""
    elsewhere = write_tiny_gguf(tmp_path / "elsewhere" / "tiny.gguf", seed=1)
    own = tmp_path / "own-models"
    own.mkdir()
    worker = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent-r",
                               name="rooted", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=0.2,
                               model_roots=[str(own)]))
    await worker.start()
    try:
        await asyncio.wait_for(worker.registered.wait(), 10)
        await admin.create_model({"name": "far", "source": str(elsewhere), "backend": "llama.cpp", "replicas": 1})

        async def refused() -> bool:
            instances = await admin.list_instances("far")
            return bool(instances) and instances[0].state == "error"

        await eventually(refused, message="the agent refusing a source outside its roots")
        message = (await admin.list_instances("far"))[0].state_message
        assert "not under a model root" in message and str(own) in message
    finally:
        await worker.stop()


def test_the_tests_model_roots_are_set_for_subprocesses():
    assert "/tmp" in os.environ["MAAS_MODEL_ROOTS"].split(os.pathsep)


async def test_maas_backend_allow_sets_the_list_and_wide_listing_shows_it(server, admin: MaasClient, api_key: str,
                                                                          tmp_path: Path):
    from typer.testing import CliRunner

    from maas_tui.cli.main import app as cli_app

    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "400"}

    def run(*args: str):
        return CliRunner().invoke(cli_app, list(args), env=env)

    allowed = await asyncio.to_thread(run, "backend", "allow", "llama.cpp", "--env", "LLAMA_LOG_COLORS",
                                      "--arg=--ctx-size")
    assert allowed.exit_code == 0, allowed.output
    assert "LLAMA_LOG_COLORS" in allowed.output and "--ctx-size" in allowed.output
    listed = await asyncio.to_thread(run, "backend", "list", "-o", "wide")
    assert "LLAMA_LOG_COLORS" in listed.output and "--ctx-size" in listed.output
    refused = await asyncio.to_thread(run, "backend", "allow", "llama.cpp", "--env", "LD_PRELOAD")
    assert refused.exit_code != 0 and "LD_PRELOAD" in refused.output
    cleared = await asyncio.to_thread(run, "backend", "allow", "llama.cpp")
    assert cleared.exit_code == 0
    assert "LLAMA_LOG_COLORS" not in {e for b in await admin.list_backends() for e in b.allowed_env}
