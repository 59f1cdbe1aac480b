"""The TUI driven with Textual's Pilot at 80x24 against the real in-process server and agents.

One agent serves on CPU ("worker-1"), one has simulated GPUs ("sim-worker", 4xH100-80GB). The
flows are the ones an operator does: navigate every view, deploy through the form (bad input is
refused and nothing is sent), watch the model become ready, scale it, describe and read the logs of
an instance, delete with confirmation; create and revoke a key; filter; lose the server; read the teams'
quotas and the audit log (refused to anyone but an admin).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any, Callable

import pytest
from rich.console import Console

from agent.agent import Agent, AgentConfig
from conftest import free_port
from maas_tui.client import MaasClient
from maas_tui.tui.app import MaasApp
from maas_tui.tui.logs import LogView
from maas_tui.tui.forms import DeployForm, KeyCreateForm, ScaleForm
from maas_tui.tui.heatmap import GpuHeatmap
from maas_tui.tui.modals import ConfirmScreen, SecretScreen
from maas_tui.tui.views import DescribeScreen, LogsScreen
from maas_tui.tui.views.dash import DashboardScreen
from maas_tui.tui.views.events import EventsScreen
from maas_tui.tui.views.gpus import GpuHistoryScreen, GpusScreen
from maas_tui.tui.views.instances import InstancesScreen
from maas_tui.tui.views.keys import KeysScreen
from maas_tui.tui.views.audit import AuditScreen
from maas_tui.tui.views.models import ModelsScreen
from maas_tui.tui.views.teams import TeamsScreen
from maas_tui.tui.views.workers import WorkersScreen
from maas_tui.tui.widgets import ClusterHeader, ResourceTable
from server import schemas
from server.app import MaasServer
from server.config import ServerConfig

pytestmark = pytest.mark.timeout(120)

SIZE = (80, 24)


def screen_text(app: MaasApp) -> str:
    """What the terminal shows now, as plain text (the same render as a screenshot)."""
    console = Console(width=SIZE[0], height=SIZE[1], file=io.StringIO(), record=True, color_system=None,
                      legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def until(pilot: Any, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


async def command(pilot: Any, text: str) -> None:
    await pilot.press("colon", *text, "enter")


def rows(app: MaasApp) -> list[str]:
    return list(app.screen.query_one(ResourceTable)._keys)


def cell(app: MaasApp, key: str, column: str) -> str:
    value = app.screen.query_one(ResourceTable).get_cell(key, column)
    return getattr(value, "plain", str(value))


@pytest.fixture
async def sim_agent(server: MaasServer, tmp_path: Path):
    sim = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "sim-agent",
                            name="sim-worker", address="127.0.0.1", simulate_gpus="4xH100-80GB",
                            heartbeat_interval=1.0))
    await sim.start()
    await asyncio.wait_for(sim.registered.wait(), 10)
    try:
        yield sim
    finally:
        await sim.stop()


async def test_navigate_deploy_scale_logs_delete(server: MaasServer, admin: MaasClient, agent, sim_agent,
                                                 tiny_model: Path):
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.connected and len(app.state.workers) == 2, what="the watch snapshot")
        assert isinstance(app.screen, DashboardScreen)
        await until(pilot, lambda: "Workers 2/2 ready" in screen_text(app), what="the header")
        header = screen_text(app).splitlines()[:2]
        assert "● live" in header[0] and "GPUs 0/4 claimed (4 sim)" in header[1]
        heatmap = app.screen.query_one(GpuHeatmap)
        assert [w.name for w in heatmap.rows] == ["sim-worker", "worker-1"]

        # Every view through the `:` command line (full names, aliases, unique prefixes).
        for text, screen_type in [("workers", WorkersScreen), ("gpu", GpusScreen), ("mo", ModelsScreen),
                                  ("pods", InstancesScreen), ("keys", KeysScreen), ("ev", EventsScreen),
                                  ("dash", DashboardScreen), ("wo", WorkersScreen)]:
            await command(pilot, text)
            await until(pilot, lambda: isinstance(app.screen, screen_type), what=f":{text}")
        assert rows(app) == ["sim-worker", "worker-1"]
        assert cell(app, "sim-worker", "GPUS") == "4 sim"
        await pilot.press("escape")  # back to the previous view
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen), what="esc goes back")
        await command(pilot, "gpus")
        await until(pilot, lambda: rows(app) == [f"sim-worker/{i}" for i in range(4)], what="4 simulated GPUs")
        await pilot.press("enter")  # the GPU's last hour from GET /v2/telemetry (the sim agent's heartbeats)
        await until(pilot, lambda: isinstance(app.screen, GpuHistoryScreen) and app.screen.history is not None,
                    what="the GPU's history")
        assert "utilisation" in screen_text(app) and "memory used" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, GpusScreen), what="esc back to the GPUs")

        # Deploy through the form: bad input is flagged in the fields and nothing is sent.
        await command(pilot, "models")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, DeployForm), what="the deploy form")
        form = app.screen
        await pilot.press(*"bad name!", "tab", *"relative.gguf")
        form.query_one("#replicas").value = "many"
        await pilot.press("ctrl+s")
        await pilot.pause()
        text = screen_text(app)
        assert "letters, digits" in text and "absolute path" in text and "whole number" in text
        assert "nothing was sent" in text
        assert await admin.list_models() == []
        assert isinstance(app.screen, DeployForm)

        form.query_one("#name").value = "tiny"
        form.query_one("#source").value = str(tiny_model)
        form.query_one("#replicas").value = "1"
        if hasattr(admin, "evaluate_model"):  # the dry run: where the replica would go; nothing is written
            await pilot.press("ctrl+r")
            await until(pilot, lambda: "Preview" in form.status_text, what="the dry-run preview")
            assert "replica 0: sim-worker gpu0" in form.status_text or "replica 0: worker-1" in form.status_text
            assert await admin.list_models() == []
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen), what="the form to close")
        assert [m.name for m in await admin.list_models()] == ["tiny"]
        await until(pilot, lambda: "tiny" in rows(app) and cell(app, "tiny", "READY") == "1/1", timeout=60,
                    what="tiny ready 1/1")

        # Scale to 2 with `s`.
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ScaleForm), what="the scale form")
        app.screen.query_one("#replicas").value = "2"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen) and cell(app, "tiny", "READY") == "2/2",
                    timeout=60, what="tiny ready 2/2")
        assert (await admin.get_model("tiny")).replicas == 2

        # `i` drills into the model's instances; Enter describes one; `l` opens its logs.
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, InstancesScreen) and len(rows(app)) == 2,
                    what="the model's instances")
        assert app.screen.filter_text == "tiny"
        name = rows(app)[0]
        assert cell(app, name, "STATE") == "running"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DescribeScreen), what="describe")
        instance = await admin.get_instance(name)
        text = screen_text(app)
        assert f"127.0.0.1:{instance.port}" in text and "Claim" in text and "Restarts" in text
        assert "Scheduled" in text or "Running" in text or "Events" in text
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LogsScreen) and app.screen.query(LogView), what="the logs")
        view = app.screen.query_one(LogView)
        await until(pilot, lambda: any("listening on" in line for line in view.lines), what="the instance's log")
        await pilot.press("slash", *"listening", "enter")
        await until(pilot, lambda: app.screen.match_count >= 1, what="a search match")
        await pilot.press("w")
        assert view.wrap
        await pilot.press("escape", "escape", "escape")  # clear the search, leave logs, leave describe
        await until(pilot, lambda: isinstance(app.screen, InstancesScreen), what="back to instances")

        # Delete the model, confirming.
        await command(pilot, "models")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("n")  # the default is no: nothing happens
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        assert [m.name for m in await admin.list_models()] == ["tiny"]
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: rows(app) == [], timeout=60, what="the model to disappear")
        assert await admin.list_models() == []

        # The event stream saw it all.
        await command(pilot, "events")
        await until(pilot, lambda: isinstance(app.screen, EventsScreen))
        text = screen_text(app)
        assert "Created" in text and "Scaled" in text


async def test_keys_create_show_once_and_revoke(server: MaasServer, admin: MaasClient):
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.connected, what="connected")
        await command(pilot, "keys")
        await until(pilot, lambda: isinstance(app.screen, KeysScreen))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, KeyCreateForm))
        await pilot.press(*"no spaces", "enter")
        await pilot.pause()
        assert "letters, digits" in screen_text(app) and await admin.list_keys() == []
        app.screen.query_one("#name").value = "ci-bot"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, SecretScreen), what="the secret")
        secret = app.screen.created.key
        assert secret.startswith("maas_") and secret in screen_text(app)
        assert [k.name for k in await admin.list_keys()] == ["ci-bot"]
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, KeysScreen) and rows(app) == ["ci-bot"], what="the key row")
        assert secret not in screen_text(app)  # shown once
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: rows(app) == [], what="the key row to go")
        assert await admin.list_keys() == []


async def test_filter_and_negation(server: MaasServer, admin: MaasClient, agent, sim_agent):
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.state.workers) == 2, what="two workers")
        await command(pilot, "workers")
        await until(pilot, lambda: rows(app) == ["sim-worker", "worker-1"])
        await pilot.press("slash", *"SIM")
        await until(pilot, lambda: rows(app) == ["sim-worker"], what="the filter")
        await pilot.press("enter")
        assert "filter /SIM" in screen_text(app)
        await pilot.press("slash", "home", "!", "enter")
        await until(pilot, lambda: rows(app) == ["worker-1"], what="the negated filter")
        await pilot.press("escape")  # clears the filter
        await until(pilot, lambda: rows(app) == ["sim-worker", "worker-1"], what="the filter to clear")
        # The heatmap filters the same way.
        await command(pilot, "dash")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.press("slash", *"worker-1", "enter")
        await until(pilot, lambda: [w.name for w in app.screen.query_one(GpuHeatmap).rows] == ["worker-1"])


async def test_survives_the_server_going_away(tmp_path: Path, tiny_model: Path):
    config = ServerConfig(data_dir=tmp_path / "data", port=free_port(),
                          database_url=f"sqlite:///{tmp_path / 'maas.db'}", resync_interval=2.0)
    first = MaasServer(config)
    await first.start()
    password = first.admin_password_file.read_text().strip()
    async with MaasClient(first.url) as anonymous:
        token = (await anonymous.login("admin", password)).token
    async with MaasClient(first.url, token) as client:
        await client.create_model({"name": "kept", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0})
    second = None
    app = MaasApp(MaasClient(first.url, token))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await command(pilot, "models")
            await until(pilot, lambda: isinstance(app.screen, ModelsScreen) and rows(app) == ["kept"], what="the model")
            await pilot.press("down")
            await first.stop()
            await until(pilot, lambda: "disconnected — reconnecting" in screen_text(app), what="disconnected")
            assert rows(app) == ["kept"]  # the last data stays
            assert app.screen.query_one(ResourceTable).selected_key == "kept"

            second = MaasServer(config)
            await second.start()
            await until(pilot, lambda: app.state.connected and "● live" in screen_text(app), what="reconnected")
            async with MaasClient(second.url, token) as client:
                await client.create_model({"name": "after", "source": str(tiny_model), "backend": "llama.cpp",
                                           "replicas": 0})
            await until(pilot, lambda: rows(app) == ["after", "kept"], what="live again after reconnecting")
            assert app.screen.query_one(ResourceTable).selected_key == "kept"  # the cursor stayed on its row
            assert isinstance(app.screen.query_one(ClusterHeader), ClusterHeader)
    finally:
        if second is not None:
            await second.stop()


async def test_a_refused_token_is_explained(server: MaasServer):
    app = MaasApp(MaasClient(server.url, "maas_not-a-valid-token"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "maas login" in app.state.error, what="the refusal")
        await until(pilot, lambda: "✖ refused — run maas login" in screen_text(app), what="the header")


def seen_recorder(pilot: Any, app: MaasApp, key: str, column: str, into: list[str]) -> Callable[[], bool]:
    """A predicate helper: remembers every value a cell showed while waiting on something else."""
    def record() -> None:
        if isinstance(app.screen, ModelsScreen) and key in rows(app):
            value = cell(app, key, column)
            if not into or into[-1] != value:
                into.append(value)
    return record


async def test_edit_rolls_out_with_pause_resume_history_and_instance_restart(server: MaasServer, admin: MaasClient,
                                                                             agent, tiny_model: Path):
    from maas_tui.tui.forms import EditForm
    from maas_tui.tui.modals import HistoryScreen

    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
    app = MaasApp(MaasClient(server.url, admin.token), start="models")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "tiny" in rows(app) and cell(app, "tiny", "READY") == "1/1", timeout=60,
                    what="tiny ready")
        assert cell(app, "tiny", "ROLLOUT") == "-"

        # Pause first: a spec change then waits, old instance serving, until resumed.
        await pilot.press("p")
        await until(pilot, lambda: app.state.model_by_name("tiny").paused, what="paused")
        assert (await admin.get_model("tiny")).paused

        # The edit form refuses bad input in the field and sends nothing.
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditForm), what="the edit form")
        form = app.screen
        form.query_one("#context").value = "lots"
        form.query_one("#max_surge").value = "0"
        await pilot.press("ctrl+s")
        await pilot.pause()
        text = screen_text(app)
        assert "whole number" in text and "cannot both be 0" in text and "nothing was sent" in text
        assert (await admin.get_model("tiny")).generation == 1
        form.query_one("#context").value = "4096"
        form.query_one("#max_surge").value = "1"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen), what="the form to close")
        model = await admin.get_model("tiny")
        assert model.generation == 2 and model.spec.context_length == 4096 and model.paused
        await until(pilot, lambda: cell(app, "tiny", "GEN") == "2" and cell(app, "tiny", "ROLLOUT").startswith("‖"),
                    what="the paused rollout")
        await pilot.pause(1.0)  # paused: no new-generation instance appears
        rollout = app.state.rollouts()[model.id]
        assert rollout.updated == 0 and rollout.outdated == 1 and rollout.available - rollout.ready == 1  # old, serving
        assert "PAUSED" in screen_text(app)

        # Resume: the progress bar moves, then the rollout completes on generation 2.
        seen: list[str] = []
        record = seen_recorder(pilot, app, "tiny", "ROLLOUT", seen)
        await pilot.press("p")

        def complete() -> bool:
            record()
            r = app.state.rollouts()[model.id]
            return not app.state.model_by_name("tiny").paused and r.outdated == 0 and r.ready == 1
        await until(pilot, complete, timeout=60, what="the rollout to complete")
        assert any("█" in s or "▒" in s or "░" in s for s in seen), seen
        await until(pilot, lambda: cell(app, "tiny", "ROLLOUT") == "-" and cell(app, "tiny", "READY") == "1/1",
                    what="the rollout shown complete")
        status = await admin.rollout_status("tiny")
        assert status.complete and status.generation == 2

        # History lists both revisions; esc closes it.
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="the history")
        assert sorted(app.screen.query_one(ResourceTable)._keys) == ["1", "2"]
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))

        # Restart the instance from the instances view, confirming.
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, InstancesScreen) and len(rows(app)) == 1)
        name = rows(app)[0]
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the restart confirmation")
        await pilot.press("y")
        await until(pilot, lambda: cell(app, name, "RST") == "1", what="the restart count")
        assert (await admin.get_instance(name)).restart_count == 1
        await until(pilot, lambda: cell(app, name, "STATE") == "running", timeout=60, what="running again")


async def test_cordon_uncordon_drain_and_sort_wide(server: MaasServer, admin: MaasClient, agent, sim_agent):
    app = MaasApp(MaasClient(server.url, admin.token), start="workers")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: rows(app) == ["sim-worker", "worker-1"], what="two workers")
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the cordon confirmation")
        await pilot.press("n")  # cancelled: nothing changes
        await until(pilot, lambda: isinstance(app.screen, WorkersScreen))
        assert not (await admin.get_worker("sim-worker")).cordoned
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: cell(app, "sim-worker", "STATE") == "ready,cordoned", what="cordoned")
        assert (await admin.get_worker("sim-worker")).cordoned
        await pilot.press("c")  # uncordon needs no confirmation
        await until(pilot, lambda: cell(app, "sim-worker", "STATE") == "ready", what="uncordoned")
        assert not (await admin.get_worker("sim-worker")).cordoned
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the drain confirmation")
        await pilot.press("y")
        await until(pilot, lambda: cell(app, "sim-worker", "STATE") == "ready,draining", what="draining")
        worker = await admin.get_worker("sim-worker")
        assert worker.draining and worker.cordoned

        # Sort: `o` cycles the column (NAME first), `O` reverses; ctrl+w adds the wide columns.
        await pilot.press("o")
        await until(pilot, lambda: "NAME↑" in screen_text(app))
        assert rows(app) == ["sim-worker", "worker-1"]
        await pilot.press("O")
        await until(pilot, lambda: rows(app) == ["worker-1", "sim-worker"], what="reversed")
        assert "NAME↓" in screen_text(app)
        await pilot.press("ctrl+w")
        await until(pilot, lambda: "ADDRESS" in app.screen.query_one(ResourceTable)._labels, what="wide")
        assert cell(app, "worker-1", "ADDRESS").startswith("127.0.0.1:")
        await pilot.press("ctrl+w")
        await until(pilot, lambda: "ADDRESS" not in app.screen.query_one(ResourceTable)._labels)


async def test_deploy_form_takes_the_servers_backends_and_rules(server: MaasServer, admin: MaasClient,
                                                                tiny_model: Path):
    """The form lists what GET /v2/backends lists (custom ones too), checks with the server's own
    ModelCreate (cpu_only with vLLM is fine, with SGLang not), and shows a refused spec under its field."""
    from textual.widgets import Checkbox, Select

    await admin.add_backend({"name": "tiny-llama", "command": ["server", "--port", "{port}"]})
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.connected, what="the watch snapshot")
        await command(pilot, "models")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, DeployForm), what="the deploy form")
        form = app.screen
        select = form.query_one("#backend", Select)
        await until(pilot, lambda: "custom:tiny-llama" in [v for _, v in select._options], what="custom backends")

        form.query_one("#name").value = "v"
        form.query_one("#source").value = "Qwen/Qwen2.5-0.5B-Instruct"
        form.query_one("#cpu_only", Checkbox).value = True
        select.value = "vllm"
        body, errors = form.validate_fields()
        assert errors == {} and body["cpu_only"] is True  # the old form refused this; the server never did
        select.value = "sglang"
        body, errors = form.validate_fields()
        assert body is None and "no CPU build" in errors["backend"]

        select.value = "llama.cpp"
        form.query_one("#cpu_only", Checkbox).value = False
        form.query_one("#source").value = str(tiny_model)
        form.query_one("#args").value = "--host 0.0.0.0"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: "--host is refused" in screen_text(app), what="the server's refusal under Args")
        assert isinstance(app.screen, DeployForm) and await admin.list_models() == []


async def test_teams_and_audit_views_for_an_admin_and_a_member(server: MaasServer, admin: MaasClient):
    GiB = 1024**3
    await admin.create_team("red")
    await admin.set_team_quota("red", schemas.TeamQuota(gpus=2, vram_bytes=80 * GiB))
    app = MaasApp(MaasClient(server.url, admin.token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.connected, what="connected")
        await command(pilot, "teams")
        await until(pilot, lambda: isinstance(app.screen, TeamsScreen) and "red" in rows(app), what="the team row")
        assert (cell(app, "red", "GPUS"), cell(app, "red", "VRAM"), cell(app, "red", "RAM"),
                cell(app, "red", "REPLICAS")) == ("0/2", "0 B/80.0 GiB", "0 B/-", "0/-")
        # ctrl+r reads the teams again.
        await admin.set_team_quota("red", schemas.TeamQuota(gpus=3, replicas=4))
        await pilot.press("ctrl+r")
        await until(pilot, lambda: cell(app, "red", "GPUS") == "0/3" and cell(app, "red", "REPLICAS") == "0/4",
                    what="the reloaded quota")
        # Enter: the team's page, with what is left of each quota.
        app.screen.select_key("red")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DescribeScreen) and "QUOTA" in screen_text(app),
                    what="the team's page")
        page = screen_text(app)
        assert "Describe team" in page and "unlimited" in page, page
        gpus = next(line.split() for line in page.splitlines() if line.split()[:1] == ["gpus"])
        assert gpus == ["gpus", "0", "3", "3"], page  # quota, used, limit, left
        await pilot.press("escape")

        # The audit log, newest first: the quota set just before is on top.
        await command(pilot, "au")
        await until(pilot, lambda: isinstance(app.screen, AuditScreen) and bool(rows(app)), what="the audit log")
        newest = rows(app)[0]
        assert cell(app, newest, "REQUEST") == "PUT /v2/teams/red/quota" and cell(app, newest, "STATUS") == "200"
        assert cell(app, newest, "ACTOR") == "admin" and cell(app, newest, "FROM") == "127.0.0.1"
        assert any(cell(app, key, "REQUEST") == "POST /v2/teams" for key in rows(app))
        # Shown again, it reads the log again: a change made meanwhile is there.
        await admin.create_team("blue")
        await command(pilot, "teams")
        await until(pilot, lambda: isinstance(app.screen, TeamsScreen) and "blue" in rows(app), what="blue on show")
        await command(pilot, "audit")
        await until(pilot, lambda: isinstance(app.screen, AuditScreen) and rows(app)[0] != newest, what="a new entry")
        await pilot.press("ctrl+w")  # wide mode: WHAT, the request's summary
        await until(pilot, lambda: "WHAT" in screen_text(app), what="the wide column")
        assert '"blue"' in cell(app, rows(app)[0], "WHAT")
        assert "only an admin" not in screen_text(app)

    await admin.create_user("mona", "password-123", teams=["red"])
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("mona", "password-123")).token
    app = MaasApp(MaasClient(server.url, token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.connected, what="connected")
        await command(pilot, "audit")
        await until(pilot, lambda: "only an admin may read the audit log" in screen_text(app), what="the refusal")
        assert isinstance(app.screen, AuditScreen) and rows(app) == []
        await command(pilot, "teams")  # a member sees its own team only
        await until(pilot, lambda: isinstance(app.screen, TeamsScreen) and rows(app) == ["red"], what="mona's team")
        assert cell(app, "red", "MEMBERS") == "mona"
