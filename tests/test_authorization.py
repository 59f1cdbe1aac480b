"""The authorization matrix: every route of the route table x every kind of caller.

Callers: anonymous, a viewer of team red, a member of red (the owning team), a member of blue (another
team), an operator, an admin, a worker token and the cluster token. Each route names a policy (who may,
who is refused, who is told the object does not exist) and how to build a request that reaches its
permission check; a destructive request gets objects of its own. A route added to the table without an
entry here fails `test_every_route_has_an_entry`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import asyncssh
import pytest

from conftest import eventually
from maas_tui.client import MaasClient
from server.api.routing import ROUTES

CALLERS = ("anonymous", "viewer", "member", "other", "operator", "admin", "worker", "cluster")
USERS = ("viewer", "member", "other", "operator", "admin")

# Outcomes: ok (neither 401, 403 nor 404: the check let it through; a 409 or 400 after it is fine),
# pass (not 401/403: a worker's request about an object that is not its own may be a 404), or the status.
OK, PASS = "ok", "pass"


def policy(**given: str) -> dict[str, str]:
    """Anonymous callers are 401 and the worker and cluster tokens 403 unless said otherwise."""
    base = {"anonymous": "401", "worker": "403", "cluster": "403"}
    return {caller: given.get(caller, base.get(caller, "403")) for caller in CALLERS}


PUBLIC = {caller: OK for caller in CALLERS}
ANY_USER = policy(**{u: OK for u in USERS})
ANY_USER_PASS = policy(**{u: PASS for u in USERS})  # the route's object may be missing for anyone
TEAM_READ = policy(viewer=OK, member=OK, other="404", operator=OK, admin=OK)
TEAM_WRITE = policy(viewer="403", member=OK, other="404", operator=OK, admin=OK)
CLUSTER = policy(operator=OK, admin=OK)
ADMIN = policy(admin=OK)
ADMIN_PASS = policy(admin=PASS)
SELF_OR_ADMIN = policy(member=OK, admin=OK)  # the route names the member's own user
USER_OR_WORKER = policy(**{u: OK for u in USERS}, worker=OK)
WORKER = policy(worker=PASS)
REGISTRAR = policy(cluster=OK)
INFERENCE_OF_RED = policy(viewer=OK, member=OK, other="404", operator=OK, admin=OK)
AUTHORIZE_RED = policy(viewer=OK, member=OK, other="403", operator=OK, admin=OK)


@dataclass
class Call:
    path: str
    body: Any = None
    params: dict[str, str] | None = None
    headers: dict[str, str] | None = None


@dataclass
class World:
    """What the requests act on; `fresh` makes objects of its own for a destructive request."""

    admin: MaasClient
    source: str
    worker_id: int
    cluster_token: str
    pubkey: str
    counter: itertools.count

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    async def red_model(self, replicas: int = 0) -> str:
        name = self.unique("red-m")
        # A selector nothing matches: an instance stays pending, no backend starts.
        await self.admin.create_model({"name": name, "source": self.source, "backend": "llama.cpp", "team": "red",
                                       "replicas": replicas, "worker_selector": {"matrix": "none"}})
        return name

    async def red_instance(self) -> str:
        return await first_instance(self.admin, await self.red_model(replicas=1))

    async def worker(self) -> str:
        name = self.unique("w")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.admin.server}/v2/agent/register", json={
                    "name": name, "address": "127.0.0.1", "agent_port": 1},
                    headers={"Authorization": f"Bearer {self.cluster_token}"}) as response:
                assert response.status in (200, 201), await response.text()
        return name


async def first_instance(admin: MaasClient, model: str) -> str:
    """The model controller creates instances on its own time."""
    await eventually(lambda: _has_instances(admin, model), message=f"an instance of {model}")
    return (await admin.list_instances(model))[0].name


async def _has_instances(admin: MaasClient, model: str) -> bool:
    return bool(await admin.list_instances(model))


def _fixed(call: Call) -> Callable[[World, str], Awaitable[Call]]:
    async def build(world: World, caller: str) -> Call:
        return call
    return build


def _red_model_call(suffix: str = "", body: Any = None, fresh: bool = False):
    async def build(world: World, caller: str) -> Call:
        name = await world.red_model() if fresh else "red-model"
        return Call(f"/v2/models/{name}{suffix}", body)
    return build


def _instance_call(suffix: str = "", fresh: bool = False):
    async def build(world: World, caller: str) -> Call:
        name = await world.red_instance() if fresh else world.shared_instance  # type: ignore[attr-defined]
        return Call(f"/v2/instances/{name}{suffix}")
    return build


def _worker_call(suffix: str = "", fresh: bool = False):
    async def build(world: World, caller: str) -> Call:
        name = await world.worker() if fresh else "matrix-worker"
        return Call(f"/v2/workers/{name}{suffix}")
    return build


async def _new_backend(world: World, caller: str) -> Call:
    return Call("/v2/backends", {"name": world.unique("be"), "command": ["server", "--port", "{port}"]})


async def _fresh_backend(world: World, caller: str) -> Call:
    name = world.unique("be")
    await world.admin.add_backend({"name": name, "command": ["server", "--port", "{port}"]})
    return Call(f"/v2/backends/{name}")


async def _new_model(world: World, caller: str) -> Call:
    return Call("/v2/models", {"name": world.unique("new-m"), "source": world.source, "backend": "llama.cpp",
                               "team": "red", "replicas": 0})


async def _evaluate(world: World, caller: str) -> Call:
    return Call("/v2/models/evaluate", {"name": "what-if", "source": world.source, "backend": "llama.cpp",
                                        "team": "red", "replicas": 1})


async def _fresh_team(world: World, caller: str) -> Call:
    name = world.unique("team")
    await world.admin.create_team(name)
    return Call(f"/v2/teams/{name}")


async def _team_with_member(world: World, caller: str) -> Call:
    name = world.unique("team")
    await world.admin.create_team(name)
    await world.admin.set_team_member(name, "mona")
    return Call(f"/v2/teams/{name}/members/mona")


async def _fresh_team_quota(world: World, caller: str) -> Call:
    name = world.unique("team")
    await world.admin.create_team(name)
    return Call(f"/v2/teams/{name}/quota", {"gpus": 4, "replicas": 8})


async def _fresh_team_member_put(world: World, caller: str) -> Call:
    name = world.unique("team")
    await world.admin.create_team(name)
    return Call(f"/v2/teams/{name}/members/mona", {"role": "viewer"})


async def _fresh_user_patch(world: World, caller: str) -> Call:
    name = world.unique("user")
    await world.admin.create_user(name, "password-123")
    return Call(f"/v2/users/{name}", {"role": "viewer"})


async def _fresh_secret(world: World, caller: str) -> Call:
    name = world.unique("secret")
    await world.admin.set_secret("red", name, "value")
    return Call(f"/v2/teams/red/secrets/{name}")


async def _fresh_user_delete(world: World, caller: str) -> Call:
    name = world.unique("user")
    await world.admin.create_user(name, "password-123")
    return Call(f"/v2/users/{name}")


async def _ssh_key_delete(world: World, caller: str) -> Call:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    added = await world.admin.request("POST", "/v2/users/mona/keys", json_body={"public_key": key})
    return Call(f"/v2/users/mona/keys/{added['id']}")


async def _own_key_delete(world: World, caller: str) -> Call:
    return Call("/v2/keys/matrix-own")  # each user made one named so (see the fixture)


ENTRIES: dict[str, tuple[dict[str, str], Callable[[World, str], Awaitable[Call]]]] = {
    "POST /v2/agent/register": (REGISTRAR, lambda w, c: _worker_register(w)),
    "POST /v2/agent/heartbeat": (WORKER, _fixed(Call("/v2/agent/heartbeat", {"gpus": [], "host": {}}))),
    "PUT /v2/agent/instances/{id}/status": (WORKER, _fixed(Call("/v2/agent/instances/999999/status",
                                                                {"state": "running"}))),
    "PUT /v2/agent/instances/{id}/ray": (WORKER, _fixed(Call("/v2/agent/instances/999999/ray",
                                                             {"address": "127.0.0.1:1"}))),
    "GET /v2/agent/instances/{id}/ray": (WORKER, _fixed(Call("/v2/agent/instances/999999/ray"))),
    "GET /v2/agent/instances/{id}/backend-key": (WORKER, _fixed(Call("/v2/agent/instances/999999/backend-key"))),
    "POST /v2/agent/instances/{id}/events": (WORKER, _fixed(Call("/v2/agent/instances/999999/events",
                                                                 {"reason": "Probe", "message": "m"}))),
    "GET /v2/backends": (USER_OR_WORKER, _fixed(Call("/v2/backends"))),
    "GET /v2/backends/{name}": (USER_OR_WORKER, _fixed(Call("/v2/backends/matrix-be"))),
    "POST /v2/backends": (CLUSTER, _new_backend),
    "DELETE /v2/backends/{name}": (CLUSTER, _fresh_backend),
    "PUT /v2/backends/{name}/allow": (CLUSTER, _fixed(Call("/v2/backends/llama.cpp/allow", {"env": [], "args": []}))),
    "GET /v2/gateway/higress": (CLUSTER, _fixed(Call("/v2/gateway/higress"))),
    "POST /v2/auth/login": (PUBLIC, _fixed(Call("/v2/auth/login", {"username": "vera", "password": "password-123"}))),
    "GET /v2/keys": (ANY_USER, _fixed(Call("/v2/keys"))),
    "POST /v2/keys": (ANY_USER, lambda w, c: _new_key(w)),
    "DELETE /v2/keys/{name}": (ANY_USER, _own_key_delete),
    "GET /v2/models": (ANY_USER, _fixed(Call("/v2/models"))),
    "POST /v2/models": (TEAM_WRITE, _new_model),
    "GET /v2/models/{name}": (TEAM_READ, _red_model_call()),
    "PATCH /v2/models/{name}": (TEAM_WRITE, _red_model_call(body={"replicas": 0}, fresh=True)),
    "DELETE /v2/models/{name}": (TEAM_WRITE, _red_model_call(fresh=True)),
    "GET /v2/instances": (ANY_USER, _fixed(Call("/v2/instances"))),
    "GET /v2/instances/{ref}": (TEAM_READ, _instance_call()),
    "DELETE /v2/instances/{ref}": (TEAM_WRITE, _instance_call(fresh=True)),
    "GET /v2/instances/{ref}/logs": (TEAM_WRITE, _instance_call("/logs")),  # logs: members, not viewers
    "GET /v2/workers": (ANY_USER, _fixed(Call("/v2/workers"))),
    "GET /v2/workers/{name}": (ANY_USER, _worker_call()),
    "DELETE /v2/workers/{name}": (CLUSTER, _worker_call(fresh=True)),
    "GET /v2/events": (ANY_USER, _fixed(Call("/v2/events"))),
    "GET /v2/models/{name}/rollout": (TEAM_READ, _red_model_call("/rollout")),
    "POST /v2/models/{name}/rollout/restart": (TEAM_WRITE, _red_model_call("/rollout/restart", fresh=True)),
    "POST /v2/models/{name}/rollout/undo": (TEAM_WRITE, _red_model_call("/rollout/undo", fresh=True)),
    "POST /v2/models/{name}/rollout/pause": (TEAM_WRITE, _red_model_call("/rollout/pause", fresh=True)),
    "POST /v2/models/{name}/rollout/resume": (TEAM_WRITE, _red_model_call("/rollout/resume", fresh=True)),
    "GET /v2/models/{name}/history": (TEAM_READ, _red_model_call("/history")),
    "POST /v2/instances/{ref}/restart": (TEAM_WRITE, _instance_call("/restart", fresh=True)),
    "POST /v2/workers/{name}/cordon": (CLUSTER, _worker_call("/cordon")),
    "POST /v2/workers/{name}/uncordon": (CLUSTER, _worker_call("/uncordon")),
    "POST /v2/workers/{name}/drain": (CLUSTER, _worker_call("/drain", fresh=True)),
    "POST /v2/workers/{name}/approve": (CLUSTER, _worker_call("/approve")),
    "POST /v2/models/evaluate": (TEAM_WRITE, _evaluate),
    "GET /v2/models/{name}/describe": (TEAM_READ, _red_model_call("/describe")),
    "GET /v2/teams": (ANY_USER, _fixed(Call("/v2/teams"))),
    "POST /v2/teams": (ADMIN, lambda w, c: _new_team(w)),
    "DELETE /v2/teams/{name}": (ADMIN, _fresh_team),
    "PUT /v2/teams/{name}/members/{username}": (ADMIN, _fresh_team_member_put),
    "PUT /v2/teams/{name}/quota": (ADMIN, _fresh_team_quota),
    "DELETE /v2/teams/{name}/members/{username}": (ADMIN, _team_with_member),
    "GET /v2/usage": (ANY_USER, _fixed(Call("/v2/usage"))),
    "GET /v2/users": (ADMIN, _fixed(Call("/v2/users"))),
    "POST /v2/users": (ADMIN, lambda w, c: _new_user(w)),
    "PATCH /v2/users/{name}": (ADMIN, _fresh_user_patch),
    "DELETE /v2/users/{name}": (ADMIN, _fresh_user_delete),
    "GET /v2/sessions": (ANY_USER, _fixed(Call("/v2/sessions"))),
    "GET /v2/audit": (ADMIN, _fixed(Call("/v2/audit"))),
    "GET /v2/teams/{team}/secrets": (TEAM_READ, _fixed(Call("/v2/teams/red/secrets"))),
    "PUT /v2/teams/{team}/secrets/{name}": (TEAM_WRITE, _fixed(Call("/v2/teams/red/secrets/s", {"value": "v"}))),
    "DELETE /v2/teams/{team}/secrets/{name}": (TEAM_WRITE, _fresh_secret),
    "GET /v2/agent/instances/{id}/secrets": (WORKER, _fixed(Call("/v2/agent/instances/999999/secrets"))),
    "DELETE /v2/sessions/{prefix}": (ANY_USER_PASS, _fixed(Call("/v2/sessions/nosuch"))),
    "GET /v2/users/{name}/keys": (SELF_OR_ADMIN, _fixed(Call("/v2/users/mona/keys"))),
    "POST /v2/users/{name}/keys": (SELF_OR_ADMIN, lambda w, c: _new_ssh_key(w)),
    "DELETE /v2/users/{name}/keys/{key}": (SELF_OR_ADMIN, _ssh_key_delete),
    "GET /v2/users/{name}/authorized-keys": (ADMIN, _fixed(Call("/v2/users/mona/authorized-keys"))),
    "POST /v2/users/{name}/sessions": (ADMIN, _fixed(Call("/v2/users/mona/sessions", {"peer": "matrix"}))),
    "DELETE /v2/users/{name}/sessions/{prefix}": (ADMIN_PASS, _fixed(Call("/v2/users/mona/sessions/nosuch"))),
    "GET /v2/watch": (USER_OR_WORKER, _fixed(Call("/v2/watch", params={"kinds": "instances"}))),
    "GET /healthz": (PUBLIC, _fixed(Call("/healthz"))),
    "GET /openapi.json": (PUBLIC, _fixed(Call("/openapi.json"))),
    "GET /metrics": (PUBLIC, _fixed(Call("/metrics"))),
    "GET /v1/models": (ANY_USER, _fixed(Call("/v1/models"))),
    "POST /v1/chat/completions": (INFERENCE_OF_RED, _fixed(Call("/v1/chat/completions", {
        "model": "red-model", "messages": [{"role": "user", "content": "hi"}]}))),
    "POST /v1/completions": (INFERENCE_OF_RED, _fixed(Call("/v1/completions", {"model": "red-model", "prompt": "hi"}))),
    "POST /v1/embeddings": (INFERENCE_OF_RED, _fixed(Call("/v1/embeddings", {"model": "red-model", "input": "hi"}))),
    "POST /v1/rerank": (INFERENCE_OF_RED, _fixed(Call("/v1/rerank", {"model": "red-model", "query": "q",
                                                                      "documents": ["d"]}))),
    "POST /v1/audio/speech": (INFERENCE_OF_RED, _fixed(Call("/v1/audio/speech", {"model": "red-model",
                                                                                  "input": "hi", "voice": "v"}))),
    "POST /v1/images/generations": (INFERENCE_OF_RED, _fixed(Call("/v1/images/generations", {
        "model": "red-model", "prompt": "hi"}))),
    "POST /v1/audio/transcriptions": (INFERENCE_OF_RED, lambda w, c: _transcription()),
    "GET /v2/gateway/authorize": (AUTHORIZE_RED, _fixed(Call("/v2/gateway/authorize",
                                                             headers={"x-higress-llm-model": "red-model"}))),
    "POST /v2/gateway/authorize": (AUTHORIZE_RED, _fixed(Call("/v2/gateway/authorize",
                                                              headers={"x-higress-llm-model": "red-model"}))),
    # Telemetry history: asked about a red instance, a team read (GPUs alone: any user, as workers).
    "GET /v2/telemetry": (TEAM_READ, lambda w, c: _red_instance_telemetry(w)),
    "GET /v2/workers/{name}/doctor": (CLUSTER, _worker_call("/doctor")),
    "GET /v2/doctor": (CLUSTER, _fixed(Call("/v2/doctor"))),
    # Alerts: everyone reads (filtered by team), admins and operators manage silences and webhooks.
    "GET /v2/alerts": (ANY_USER, _fixed(Call("/v2/alerts"))),
    "GET /v2/alerts/silences": (ANY_USER, _fixed(Call("/v2/alerts/silences"))),
    "POST /v2/alerts/silences": (CLUSTER, _fixed(Call("/v2/alerts/silences", {"rule": "WorkerNotReady",
                                                                              "duration_seconds": 3600}))),
    "DELETE /v2/alerts/silences/{id}": (CLUSTER, lambda w, c: _fresh_silence(w)),
    "GET /v2/alerts/webhooks": (CLUSTER, _fixed(Call("/v2/alerts/webhooks"))),
    "POST /v2/alerts/webhooks": (CLUSTER, _fixed(Call("/v2/alerts/webhooks", {"url": "http://127.0.0.1:9/hook"}))),
    "DELETE /v2/alerts/webhooks/{id}": (CLUSTER, lambda w, c: _fresh_webhook(w)),
    # Benchmarks and the rollout bench gate: the model's team.
    "GET /v2/models/{name}/bench": (TEAM_READ, _red_model_call("/bench")),
    "POST /v2/models/{name}/bench": (TEAM_WRITE, _red_model_call("/bench", body={
        "prompt_tokens": 8, "max_tokens": 8, "levels": [{"concurrency": 1, "requests": 1}]})),
    "PUT /v2/models/{name}/bench/gate": (TEAM_WRITE, _red_model_call("/bench/gate", body={
        "expression": "ttft_p95 <= 1.1 * previous"}, fresh=True)),
    "DELETE /v2/models/{name}/bench/gate": (TEAM_WRITE, lambda w, c: _gated_red_model(w)),
}


# Model routes: like models, the red team's (their targets are red models).
async def _red_route(world: World, caller: str, fresh: bool = False) -> str:
    from maas_tui.client import ApiClientError

    name = world.unique("red-route") if fresh else "red-route"
    try:
        await world.admin.request("POST", "/v2/routes", json_body={"name": name, "team": "red",
                                                                   "targets": [{"model": "red-model", "weight": 1}]})
    except ApiClientError as exc:
        assert exc.status == 409 and not fresh, exc  # made for an earlier caller
    return name


def _route_call(method_body: dict | None = None, fresh: bool = False):
    async def build(world: World, caller: str) -> Call:
        return Call(f"/v2/routes/{await _red_route(world, caller, fresh)}", method_body)
    return build


async def _new_route(world: World, caller: str) -> Call:
    return Call("/v2/routes", {"name": world.unique("new-route"), "team": "red",
                               "targets": [{"model": "red-model", "weight": 1}]})


ENTRIES.update({
    "GET /v2/routes": (ANY_USER, _fixed(Call("/v2/routes"))),
    "POST /v2/routes": (TEAM_WRITE, _new_route),
    "GET /v2/routes/{name}": (TEAM_READ, _route_call()),
    "PATCH /v2/routes/{name}": (TEAM_WRITE, _route_call({"targets": [{"model": "red-model", "weight": 3}]}, fresh=True)),
    "DELETE /v2/routes/{name}": (TEAM_WRITE, _route_call(fresh=True)),
    "POST /v1/responses": (INFERENCE_OF_RED, _fixed(Call("/v1/responses", {"model": "red-model", "input": "hi"}))),
    "POST /v1/messages": (INFERENCE_OF_RED, _fixed(Call("/v1/messages", {
        "model": "red-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}))),
})


async def _worker_register(world: World) -> Call:
    return Call("/v2/agent/register", {"name": world.unique("reg"), "address": "127.0.0.1", "agent_port": 1})


async def _new_key(world: World) -> Call:
    return Call("/v2/keys", {"name": world.unique("key")})


async def _new_team(world: World) -> Call:
    return Call("/v2/teams", {"name": world.unique("team")})


async def _new_user(world: World) -> Call:
    return Call("/v2/users", {"username": world.unique("user"), "password": "password-123"})


async def _new_ssh_key(world: World) -> Call:
    return Call("/v2/users/mona/keys",
                {"public_key": asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()})


async def _transcription() -> Call:
    form = aiohttp.FormData()
    form.add_field("model", "red-model")
    form.add_field("file", b"RIFF....", filename="a.wav", content_type="audio/wav")
    return Call("/v1/audio/transcriptions", form)


def _key(route) -> str:
    return f"{route.method} {route.path}"


def test_every_route_has_an_entry():
    routes = {_key(r) for r in ROUTES}
    assert routes - ENTRIES.keys() == set(), "routes without an authorization entry"
    assert ENTRIES.keys() - routes == set(), "entries for routes that no longer exist"


def _matches(status: int, expected: str) -> bool:
    got = str(status) if status in (401, 403, 404) else OK
    return got == expected or (expected == PASS and got in (OK, "404"))


@pytest.fixture
async def world(server, admin: MaasClient, tiny_model: Path):
    await admin.create_team("red")
    await admin.create_team("blue")
    await admin.create_user("vera", "password-123", role="viewer", teams=["red"])
    await admin.create_user("mona", "password-123", role="member", teams=["red"])
    await admin.create_user("otto", "password-123", role="member", teams=["blue"])
    await admin.create_user("opal", "password-123", role="operator")
    await admin.create_model({"name": "red-model", "source": str(tiny_model), "backend": "llama.cpp", "team": "red",
                              "replicas": 1, "worker_selector": {"matrix": "none"}})
    await admin.add_backend({"name": "matrix-be", "command": ["server", "--port", "{port}"]})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/agent/register", json={
                "name": "matrix-worker", "address": "127.0.0.1", "agent_port": 1},
                headers={"Authorization": f"Bearer {server.cluster_token}"}) as response:
            registered = await response.json()
    tokens = {"anonymous": None, "admin": admin.token, "worker": registered["token"], "cluster": server.cluster_token}
    for caller, username in (("viewer", "vera"), ("member", "mona"), ("other", "otto"), ("operator", "opal")):
        async with MaasClient(server.url) as anonymous:
            tokens[caller] = (await anonymous.login(username, "password-123")).token
    for caller in USERS:
        async with MaasClient(server.url, tokens[caller]) as client:
            await client.create_key("matrix-own")
    built = World(admin=admin, source=str(tiny_model), worker_id=registered["worker"]["id"],
                  cluster_token=server.cluster_token, pubkey="", counter=itertools.count())
    built.shared_instance = await first_instance(admin, "red-model")  # type: ignore[attr-defined]
    built.tokens = tokens  # type: ignore[attr-defined]
    return built


async def test_the_authorization_matrix(server, world: World):
    failures = []
    checked = 0
    async with aiohttp.ClientSession() as http:
        for key, (expected, build) in ENTRIES.items():
            method = key.split(" ", 1)[0]
            for caller in CALLERS:
                call = await build(world, caller)
                headers = dict(call.headers or {})
                if (token := world.tokens[caller]) is not None:  # type: ignore[attr-defined]
                    headers["Authorization"] = f"Bearer {token}"
                kwargs: dict[str, Any] = {"params": call.params, "headers": headers}
                if isinstance(call.body, aiohttp.FormData):
                    kwargs["data"] = call.body
                elif call.body is not None:
                    kwargs["json"] = call.body
                async with http.request(method, server.url + call.path, **kwargs) as response:
                    status = response.status  # streams (the watch) are left unread
                checked += 1
                if not _matches(status, expected[caller]):
                    failures.append(f"{key} as {caller}: {status}, expected {expected[caller]}")
    assert not failures, f"{len(failures)} of {checked} cells differ:\n" + "\n".join(failures)
    assert checked == len(ENTRIES) * len(CALLERS)


async def _fresh_silence(world: World) -> Call:
    made = await world.admin.request("POST", "/v2/alerts/silences", json_body={"rule": "GpuTemperature",
                                                                              "duration_seconds": 600})
    return Call(f"/v2/alerts/silences/{made['id']}")


async def _fresh_webhook(world: World) -> Call:
    made = await world.admin.request("POST", "/v2/alerts/webhooks", json_body={"url": "http://127.0.0.1:9/x"})
    return Call(f"/v2/alerts/webhooks/{made['id']}")


async def _gated_red_model(world: World) -> Call:
    name = await world.red_model()
    await world.admin.request("PUT", f"/v2/models/{name}/bench/gate", json_body={"expression": "ttft_p95 <= 500"})
    return Call(f"/v2/models/{name}/bench/gate")


async def _red_instance_telemetry(world: World) -> Call:
    return Call("/v2/telemetry", params={"instance": world.shared_instance})  # type: ignore[attr-defined]


# Model files in the workers' caches (issue 19): operators and admins pull and remove, every user lists.
async def _fresh_file(world: World, caller: str) -> Call:
    [row] = await world.admin.pull_files(f"hf://acme/{world.unique('files')}", workers=["matrix-worker"])
    return Call(f"/v2/files/{row.id}")


ENTRIES.update({
    "GET /v2/files": (ANY_USER, _fixed(Call("/v2/files"))),
    "POST /v2/files": (CLUSTER, _fixed(Call("/v2/files", {"source": "hf://acme/tiny", "workers": ["matrix-worker"]}))),
    "DELETE /v2/files/{id}": (CLUSTER, _fresh_file),
    "PUT /v2/agent/files": (WORKER, _fixed(Call("/v2/agent/files", {"files": []}))),
})


# Gateway limits (server/services/limits.py): your own key's, a team's (admin), a model's (admins, operators).
ENTRIES.update({
    "GET /v2/limits": (ANY_USER, _fixed(Call("/v2/limits"))),
    "PATCH /v2/keys/{name}/limits": (ANY_USER, lambda w, c: _own_fresh_key_limits(w, c)),
    "PATCH /v2/teams/{name}/limits": (ADMIN, _fixed(Call("/v2/teams/red/limits", {"rpm": 100000}))),
    "PATCH /v2/models/{name}/limits": (policy(viewer="403", member="403", other="404", operator=OK, admin=OK),
                                       _fixed(Call("/v2/models/red-model/limits", {"rpm": 100000}))),
})


async def _own_fresh_key_limits(world: World, caller: str) -> Call:
    """A key of the caller's own (the matrix revokes matrix-own earlier)."""
    name = world.unique("limited")
    if caller in USERS:
        async with MaasClient(world.admin.server, world.tokens[caller]) as client:  # type: ignore[attr-defined]
            await client.create_key(name)
    return Call(f"/v2/keys/{name}/limits", {"rpm": 100000})
