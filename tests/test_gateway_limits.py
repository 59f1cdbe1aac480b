"""Gateway limits through the official `openai` client against real llama.cpp instances: rpm, tpm,
concurrency and budgets each hit (429, RateLimitError, the limit named, Retry-After, x-ratelimit-*)
and reset, plain and streamed; budgets read back from the usage table; LimitNearlyReached once; and
two servers on one PostgreSQL holding one limit together.

The limiter's minute is scaled down (`limits.window`, seconds): a limit of N per window is the same
mechanism as N per minute, and the tests wait for fresh windows instead of minutes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from typer.testing import CliRunner

from conftest import HAVE_POSTGRES, eventually, free_port
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.gateway.limit_exchange import new_part
from server.gateway.limits import GatewayLimits

pytestmark = pytest.mark.timeout(240)
PROMPT = [{"role": "user", "content": "hello there"}]
WINDOW = 3.0  # seconds: the scaled minute


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`maas ...` in a thread (it runs its own event loop), with a config file of its own."""
    monkeypatch.setenv("MAAS_CONFIG", str(tmp_path / "maas-config.json"))
    for name in ("MAAS_SERVER", "MAAS_API_KEY", "MAAS_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    async def invoke(*args: str, env: dict[str, str] | None = None):
        return await asyncio.to_thread(runner.invoke, cli_app, list(args), env=env)
    return invoke


async def _deploy(server: MaasServer, admin: MaasClient, name: str, tiny_model: Path) -> None:
    await admin.create_model({"name": name, "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1,
                              "args": ["--parallel", "4"]})

    async def running() -> bool:
        return any(i.state == "running" for i in await admin.list_instances(name))
    await eventually(running, timeout=60, message=f"a running instance of {name}")
    await eventually(lambda: _serving(server, name), message=f"the gateway routing to {name}")


async def _fresh_window(*servers: MaasServer) -> None:
    """Sleep into the start of the next window (the servers' windows are aligned to the epoch)."""
    window = servers[0].limits.window
    await asyncio.sleep(window - time.time() % window + 0.05)


async def _chat(client: openai.AsyncOpenAI, model: str, stream: bool = False, max_tokens: int = 4):
    """One request; streamed ones are read to the end. Returns the raw response (its headers)."""
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=PROMPT, max_tokens=max_tokens,
                                                                 stream=stream)
    parsed = raw.parse()
    if stream:
        assert [chunk async for chunk in parsed]
    return raw


async def _refused(client: openai.AsyncOpenAI, model: str, stream: bool = False) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(client, model, stream)
    return caught.value


async def test_limits_hit_and_reset(server: MaasServer, admin: MaasClient, agent, tiny_model: Path, cli) -> None:
    server.limits.window = WINDOW
    await _deploy(server, admin, "lim", tiny_model)
    key = (await admin.create_key("limited")).key
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    try:
        # --- rpm on the key: 3 a window, plain and streamed ----------------------------------
        for stream in (False, True):
            await admin.set_limits("key", "limited", {"rpm": 3})
            await _fresh_window(server)
            remaining = [(await _chat(client, "lim", stream)).headers["x-ratelimit-remaining-requests"]
                         for _ in range(3)]
            assert remaining == ["2", "1", "0"]
            error = await _refused(client, "lim", stream)
            assert error.code == "rate_limit_exceeded" and "API key 'limited'" in error.message
            assert "3 requests per minute (rpm)" in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= WINDOW
            assert error.response.headers["x-ratelimit-limit-requests"] == "3"
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            await _fresh_window(server)  # the reset: a new window
            raw = await _chat(client, "lim", stream)
            assert raw.headers["x-ratelimit-remaining-requests"] == "2"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")

        # --- tpm on the key: one answer's tokens fill it; streamed answers count too ----------
        one = (await _chat(client, "lim")).parse().usage.total_tokens
        await admin.set_limits("key", "limited", {"rpm": None, "tpm": one})
        for stream in (False, True):
            await _fresh_window(server)
            raw = await _chat(client, "lim", stream)  # the client asks no usage: the gateway counts it anyway
            assert raw.headers["x-ratelimit-limit-tokens"] == str(one)
            assert "x-ratelimit-limit-requests" not in raw.headers
            error = await _refused(client, "lim", stream)
            assert error.code == "rate_limit_exceeded" and f"{one} tokens per minute (tpm)" in error.message
            assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"
        await _fresh_window(server)
        await _chat(client, "lim", True)
        await admin.set_limits("key", "limited", {"tpm": None})

        # --- concurrency on the model: one at a time -------------------------------------------
        await admin.set_limits("model", "lim", {"max_concurrency": 1})
        for stream in (False, True):
            results = await asyncio.gather(*(_chat(client, "lim", stream, max_tokens=48) for _ in range(6)),
                                           return_exceptions=True)
            refusals = [r for r in results if isinstance(r, openai.RateLimitError)]
            assert refusals and len(refusals) < 6, results
            assert all(not isinstance(r, Exception) or isinstance(r, openai.RateLimitError) for r in results), results
            assert "model 'lim'" in refusals[0].message and "max_concurrency" in refusals[0].message
            await _chat(client, "lim", stream)  # the others finished: one fits again
        await admin.set_limits("model", "lim", {"max_concurrency": None})

        # --- a day budget on the team: exhausted until the day ends ---------------------------
        await admin.set_limits("team", "default", {"budget_day": 10**9})

        async def counted() -> bool:  # what the usage table holds for the team today, read in
            return (await _team_limits(admin)).usage.tokens_today > 0
        await eventually(counted, message="the team's usage today read from the usage table")
        used = (await _team_limits(admin)).usage.tokens_today
        await admin.set_limits("team", "default", {"budget_day": used + 1})
        await _chat(client, "lim")  # under the budget by one token: admitted, and now over it
        for stream in (False, True):
            error = await _refused(client, "lim", stream)
            assert error.code == "budget_exceeded" and "daily token budget of the team 'default'" in error.message
            assert int(error.response.headers["Retry-After"]) <= 86400

        async def nearly_reached() -> bool:
            return any(e.reason == "LimitNearlyReached" and e.object_name == "default"
                       for e in await admin.list_events(limit=200, kind="teams"))
        await eventually(nearly_reached, message="a LimitNearlyReached event for the team")

        # Durable: a limiter started now derives the same day's usage from the usage table.
        await server.limits.refresh_budgets()
        fresh = GatewayLimits()
        fresh.db, fresh.usage = server.db, server.usage
        await fresh.load()
        await fresh.refresh_budgets()
        assert fresh.rules[("team", "default")].used_day() == server.limits.rules[("team", "default")].used_day() > used

        real_clock = server.limits.clock
        server.limits.clock = lambda: real_clock() + 86400  # the next UTC day
        try:
            await _chat(client, "lim", True)  # the day's budget starts again
        finally:
            server.limits.clock = real_clock
        events = [e for e in await admin.list_events(limit=500, kind="teams") if e.reason == "LimitNearlyReached"]
        assert len(events) == 1, events  # once per period
        await admin.set_limits("team", "default", {"budget_day": None})
    finally:
        await client.close()

    # Hostile input: a 4xx that says what is wrong; others' keys are not found.
    for body in ({"rpm": -1}, {"rpm": "5"}, {"rpm": 1.5}, {"nonsense": 1}):
        with pytest.raises(ApiClientError) as caught:
            await admin.set_limits("key", "limited", body)
        assert caught.value.status == 422, body
    with pytest.raises(ApiClientError) as caught:
        await admin.set_limits("key", "nosuch", {"rpm": 1})
    assert caught.value.status == 404

    # The CLI: set on create and update, shown by key list and describe.
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": admin.token}
    result = await cli("key", "create", "cli-limited", "--rpm", "60", "--budget-month", "5M", env=env)
    assert result.exit_code == 0, result.output
    result = await cli("key", "update", "cli-limited", "--tpm", "10k", "--rpm", "none", env=env)
    assert result.exit_code == 0 and "tpm 10k, 5M/month" in result.output, result.output
    result = await cli("key", "list", env=env)
    assert "LIMITS" in result.output and "tpm 10k, 5M/month" in result.output, result.output
    result = await cli("key", "describe", "cli-limited", env=env)
    assert "tokens this minute" in result.output, result.output
    result = await cli("model", "limits", "lim", "--rpm", "1000", env=env)
    assert result.exit_code == 0 and "model lim: rpm 1k" in result.output, result.output
    assert (await cli("team", "limits", "default", "--tpm", "lots", env=env)).exit_code == 2

    # What goes takes its limits along (their rows go by ON DELETE CASCADE): a deleted key's, team's, and a
    # deleted user's keys' limits leave the limiter's memory too (a name made again starts unlimited).
    await admin.create_team("short-lived")
    await admin.set_limits("team", "short-lived", {"rpm": 5})
    await admin.create_user("leaver", "leaver-password-1", teams=["short-lived"])
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("leaver", "leaver-password-1")).token
    async with MaasClient(server.url, token) as leaver:
        leavers_key = await leaver.create_key("leaving")
        await leaver.set_limits("key", "leaving", {"tpm": 100})
    cli_key = next(k for k in await admin.list_keys() if k.name == "cli-limited")
    held = {("team", "short-lived"), ("key", leavers_key.id), ("key", cli_key.id)}

    async def limiter_holds(expected: set) -> bool:
        return held & set(server.limits.rules) == expected
    await eventually(lambda: limiter_holds(held), message="the limiter holding the new limits")
    await admin.delete_key("cli-limited")
    await admin.delete_user("leaver")
    await admin.delete_team("short-lived")
    await eventually(lambda: limiter_holds(set()), message="the deleted key's, user's and team's limits gone")


async def _team_limits(admin: MaasClient):
    return next(item for item in await admin.list_limits("team") if item.subject == "default")


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_two_servers_hold_one_limit(server: MaasServer, admin: MaasClient, agent, tiny_model: Path,
                                          tmp_path: Path) -> None:
    """Requests spread over two servers sharing one PostgreSQL: the cluster admits the limit, not twice it
    (at most 5% over), and about all of it."""
    second = MaasServer(ServerConfig(data_dir=tmp_path / "second", port=free_port(),
                                     database_url=server.config.database_url, resync_interval=2.0,
                                     cluster_token=server.cluster_token))
    await second.start()
    clients: list[openai.AsyncOpenAI] = []
    try:
        window, limit = 5.0, 30
        server.limits.window = second.limits.window = window
        await _deploy(server, admin, "shared", tiny_model)
        await eventually(lambda: _serving(second, "shared"), message="the second server routing to the model")
        key = await admin.create_key("shared-key")
        await admin.set_limits("key", "shared-key", {"rpm": limit})
        await eventually(lambda: _knows(second, key.id), message="the second server knowing the limit")

        async def both_hold_a_part() -> bool:  # each has seen the other in an exchange; idle, they split it
            rules = [s.limits.rules.get(("key", key.id)) for s in (server, second)]
            return all(rule is not None and rule.peers and rule.cap_requests > 0 for rule in rules)
        await eventually(both_hold_a_part, message="both servers holding a part of the limit")
        clients = [openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key=key.key, max_retries=0) for s in (server, second)]
        admitted = [0, 0]
        refused = 0

        async def drive(which: int, until: float) -> None:
            nonlocal refused
            while time.time() < until:
                try:
                    await clients[which].chat.completions.create(model="shared", messages=PROMPT, max_tokens=1)
                    admitted[which] += 1
                except openai.RateLimitError:
                    refused += 1
                    await asyncio.sleep(0.02)
        await _fresh_window(server)
        until = time.time() + window - 1.0  # inside one window
        await asyncio.gather(*(drive(i % 2, until) for i in range(8)))
        total = sum(admitted)
        # Both servers were asked and both admit (their parts follow demand); the cluster admits the limit
        # once, not once per server.
        assert refused > 0 and admitted[0] > 0 and admitted[1] > 0, (admitted, refused)
        assert 0.8 * limit <= total <= 1.05 * limit, (admitted, refused)
    finally:
        for client in clients:
            await client.close()
        await second.stop()


async def _serving(server: MaasServer, model: str) -> bool:
    routes = server.routes.models.get(model)
    return routes is not None and bool(routes.ordered())


async def _knows(server: MaasServer, key_id: int) -> bool:
    return ("key", key_id) in server.limits.rules


def _exchanges(limit: int, parts: list[int], demand: list[int], used: list[int], rounds: int) -> list[int]:
    """`rounds` exchanges of every server in turn (serialized, as under the advisory lock), with fixed demand
    and use; returns the parts."""
    ids = [f"s{i}" for i in range(len(parts))]
    for _ in range(rounds):
        for i in range(len(parts)):
            theirs = [(ids[j], parts[j], demand[j]) for j in range(len(parts)) if j != i]
            parts[i] = new_part(limit, used[i], parts[i], demand[i], ids[i], theirs)
            assert sum(parts) <= limit, parts
    return parts


def test_parts_never_add_up_to_more_than_the_limit() -> None:
    """new_part, exchange by exchange (serialized, as under the advisory lock), with random use, demand, window
    ends and a limit lowered: the servers' parts of a limit never add up to more than it once they did not,
    and their sum never grows while it is over (a lowered limit, or servers that each held it alone)."""
    random = __import__("random").Random(20261203)
    for _ in range(3000):
        servers, limit = random.randint(2, 5), random.randint(0, 200)
        ids = [f"s{i}" for i in range(servers)]
        parts, demand, used = [0] * servers, [0] * servers, [0] * servers
        parts[random.randrange(servers)] = limit  # the one that was alone
        for _ in range(40):
            if random.random() < 0.1:  # a new window: nothing used yet
                used = [0] * servers
            if random.random() < 0.05:  # the limit lowered: the parts must come down, never go up
                limit = random.randint(0, limit)
            i = random.randrange(servers)
            used[i] = random.randint(used[i], max(used[i], parts[i]))  # within its part, never less than before
            demand[i] = random.choice((0, 0, 1, random.randint(0, 1000)))
            before = sum(parts)
            theirs = [(ids[j], parts[j], demand[j]) for j in range(servers) if j != i]
            parts[i] = new_part(limit, used[i], parts[i], demand[i], ids[i], theirs)
            assert parts[i] >= used[i] >= 0, (parts, used)  # never below what it used: no overshoot
            assert sum(parts) <= max(limit, before), (limit, before, parts)


def test_parts_follow_demand() -> None:
    """Within two exchanges each: two equally asked servers split a limit that the first held alone; a busy
    server among idle ones gets all of it; idle servers split it evenly; a part never drops below what its
    server used this window (it comes down in the next one); a limit of 1 is held by one idle server."""
    assert _exchanges(30, [30, 0], [40, 40], [0, 0], rounds=2) == [15, 15]
    assert _exchanges(31, [0, 31], [7, 7], [0, 0], rounds=2) in ([16, 15], [15, 16])
    assert _exchanges(300, [100, 100, 100], [50, 0, 0], [0, 0, 0], rounds=2) == [300, 0, 0]
    assert _exchanges(300, [300, 0, 0], [0, 0, 0], [0, 0, 0], rounds=2) == [100, 100, 100]
    assert _exchanges(300, [10, 0, 0], [30, 10, 0], [0, 0, 0], rounds=2) == [225, 75, 0]
    parts = _exchanges(30, [30, 0], [5, 5], [30, 0], rounds=2)  # the first used all of it this window
    assert parts == [30, 0]
    assert _exchanges(30, parts, [5, 5], [0, 0], rounds=2) == [15, 15]  # the next window
    assert sorted(_exchanges(1, [0, 0], [0, 0], [0, 0], rounds=1)) == [0, 1]
    assert new_part(30, 0, 0, 0, "s0", []) == 30  # alone: all of it
    assert new_part(None, 0, 5, 3, "s0", [("s1", 0, 0)]) == 0
