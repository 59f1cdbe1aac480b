"""TUI parts on their own: the cluster state fed by watch messages, filters, commands, the
line-virtualised log view (100,000 lines) and table (the cursor stays on its row)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Callable

import pytest
from textual.app import App, ComposeResult

from maas_tui.render import format as fmt
from maas_tui.tui.demo import DemoClient, demo_state, fixed_clock, make_worker
from maas_tui.tui.app import MaasApp
from maas_tui.tui.logs import LogView, clean_line
from maas_tui.tui.heatmap import GpuHeatmap
from maas_tui.tui.state import ClusterState
from maas_tui.tui.views import LogsScreen, resolve_command
from maas_tui.tui.views.dash import DashboardScreen
from maas_tui.tui.views.instances import InstancesScreen
from maas_tui.tui.views.models import ModelsScreen
from maas_tui.tui.widgets import ResourceTable
from server.schemas.rollout import rollout_in_progress
from server import schemas

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


async def until(pilot: Any, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(0.02)


def instance(iid: int, state: str, model_id: int = 1, worker_id: int | None = 1, gpus: list[int] | None = None,
             vram: int = 0) -> dict[str, Any]:
    claim = {"device": "gpu", "gpu_indexes": gpus, "vram_bytes_per_gpu": vram} if gpus else None
    return schemas.InstanceOut(
        id=iid, name=f"m-{iid}", model_id=model_id, model_name="m", generation=1,
        spec=schemas.ModelSpec(source="/m.gguf", backend="llama.cpp"), state=state, worker_id=worker_id,
        worker_name="w1" if worker_id else None, claim=claim, created_at=NOW, updated_at=NOW).model_dump(mode="json")


def test_state_applies_snapshot_and_events():
    state = ClusterState(history=3)
    worker = make_worker(1, "w1", [("H100-80GB", 80)] * 2).model_dump(mode="json")
    model = schemas.ModelOut(id=1, name="m", spec=schemas.ModelSpec(source="/m.gguf", backend="llama.cpp"), replicas=2,
                             generation=1, state="active", created_at=NOW, updated_at=NOW).model_dump(mode="json")
    changed = state.apply(schemas.WatchMessage(type="snapshot", version=10, items={
        "workers": [worker], "models": [model], "instances": [instance(1, "running", gpus=[0], vram=10 * 1000**3),
                                                              instance(2, "pending", worker_id=None)],
        "events": []}))
    assert changed == {"workers", "models", "instances", "events"} and state.version == 10
    summary = state.summary()
    assert (summary.workers_ready, summary.workers_total, summary.gpus_total, summary.gpus_claimed,
            summary.gpus_simulated) == (1, 1, 2, 1, 2)
    assert (summary.replicas_ready, summary.replicas_desired, summary.models_ready) == (1, 2, 0)
    assert state.claimed_bytes(1, 0) == 10 * 1000**3 and state.claimed_bytes(1, 1) == 0

    # Events: an instance becomes running, another appears in error, the worker reports usage.
    state.apply(schemas.WatchMessage(type="event", version=11, kind="instances", action="updated",
                                     object=instance(2, "running", gpus=[1], vram=1)))
    state.apply(schemas.WatchMessage(type="event", version=12, kind="instances", action="created",
                                     object=instance(3, "error", gpus=[1], vram=1)))
    for step in range(5):
        state.apply(schemas.WatchMessage(type="event", version=13 + step, kind="workers", action="updated",
                                         object=make_worker(1, "w1", [("H100-80GB", 80)] * 2, float(step))
                                         .model_dump(mode="json")))
    summary = state.summary()
    assert (summary.replicas_ready, summary.models_ready, summary.instances_error, summary.alerts) == (2, 1, 1, 1)
    assert len(state.gpu_util[(1, 0)]) == 3  # bounded history
    state.apply(schemas.WatchMessage(type="event", version=20, kind="instances", action="deleted",
                                     object=instance(3, "error")))
    assert state.summary().instances_error == 0
    state.apply(schemas.WatchMessage(type="heartbeat", version=21))
    assert state.version == 21

    # A new snapshot (after a reconnect the server no longer remembers) replaces everything.
    state.apply(schemas.WatchMessage(type="snapshot", version=30, items={"workers": [], "models": [],
                                                                        "instances": []}))
    assert state.summary().workers_total == 0 and state.gpu_util == {}


def test_filters_and_commands():
    assert fmt.matches("", "anything") and fmt.matches("LLAMA", "llama-3 running")
    assert not fmt.matches("!llama", "llama-3") and fmt.matches("!llama", "qwen")
    assert fmt.matches("!", "anything")
    assert resolve_command(":workers") == "workers" and resolve_command("po") == "instances"
    assert resolve_command("inst") == "instances" and resolve_command("ev") == "events"
    assert resolve_command("mod") == "models"  # a unique prefix
    assert resolve_command("q") == "quit" and resolve_command("nope") is None and resolve_command("") is None
    assert clean_line("\x1b[32mgreen\x1b[0m\tx\x07") == "green   x"
    assert fmt.age(datetime(2025, 6, 1, 11, 58), NOW) == "2m"  # naive times from the server are UTC
    assert fmt.sparkline([0, 50, 100], 5) == "  ▁▅█"


class Harness(App):
    def __init__(self, widget: Any) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


async def test_log_view_takes_100k_lines_and_caps_memory():
    view = LogView(max_lines=150_000)
    app = Harness(view)
    async with app.run_test(size=(80, 24)) as pilot:
        started = time.perf_counter()
        for chunk in range(10):
            view.append(f"line {chunk * 10_000 + i} some text here GET /v1/models 200" for i in range(10_000))
            await pilot.pause()
        elapsed = time.perf_counter() - started
        assert view.line_count == 100_000
        assert elapsed < 5.0, f"appending 100,000 lines took {elapsed:.1f} s"
        assert view.scroll_offset.y == view.max_scroll_y > 99_000  # following the end
        assert "line 99999 " in "".join(s.text for s in view.render_line(view.scrollable_content_region.height - 1))
        view.set_search("line 5000")
        assert len(view.matches()) == 11  # 5000, 50000..50009
        assert view.find(True) is not None and not view.follow
        view.set_wrap(True)
        await pilot.pause()
        assert view.virtual_size.height >= 100_000
        view.append(f"more {i}" for i in range(60_000))  # over the cap: the oldest go
        assert view.line_count <= 150_000 and view.lines[-1] == "more 59999"


async def test_table_cursor_stays_on_its_row():
    table = ResourceTable([("NAME", None), ("STATE", None)])
    app = Harness(table)
    async with app.run_test(size=(40, 10)) as pilot:
        table.sync([("a", ("a", "ok")), ("b", ("b", "ok")), ("c", ("c", "ok"))])
        table.move_cursor(1)
        await pilot.pause()
        assert table.selected_key == "b"
        table.sync([("0", ("0", "new")), ("a", ("a", "ok")), ("b", ("b", "changed")), ("c", ("c", "ok"))])
        assert table.selected_key == "b" and table.get_cell("b", "STATE") == "changed"
        table.sync([("0", ("0", "new")), ("c", ("c", "ok"))])  # b went away: the cursor stays at its place
        assert table.selected_key == "c"
        table.sync([(f"r{i}", (f"r{i}", "ok")) for i in range(1000)])
        await pilot.press("end")
        assert table.selected_key == "r999" and table.scroll_offset.y > 900
        await pilot.press("home", "down", "down")
        assert table.selected_key == "r2"


async def test_logs_screen_streams_100k_lines():
    state = demo_state()
    app = MaasApp(DemoClient(state, log_lines=100_000), state=state, clock=fixed_clock, tick=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.state.connected)
        started = time.perf_counter()
        app.push_screen(LogsScreen("tiny-2c4e6a", tail=-1))
        await until(pilot, lambda: isinstance(app.screen, LogsScreen) and app.screen.query(LogView)
                    and app.screen.log_view.line_count == 100_000)
        assert time.perf_counter() - started < 10
        await pilot.pause()
        view = app.screen.log_view
        assert "task 99999 " in "".join(s.text for s in view.render_line(view.scrollable_content_region.height - 1))
        await pilot.press("home")
        assert view.scroll_offset.y == 0 and not view.follow
        await pilot.press("f")
        assert view.follow


async def test_heatmap_scrolls_a_thousand_gpus():
    state = ClusterState()
    for wid in range(1, 251):
        state.apply_event("workers", "created", make_worker(wid, f"sim-{wid:03d}", [("H100-80GB", 80)] * 4, 0.0)
                          .model_dump(mode="json"))
    app = MaasApp(DemoClient(state), state=state, clock=fixed_clock, tick=0, watch=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        heatmap = app.screen.query_one(GpuHeatmap)
        await until(pilot, lambda: len(heatmap.rows) == 250)
        assert sum(len(w.gpus) for w in heatmap.rows) == 1000
        await pilot.press("end")
        assert heatmap.current.name == "sim-250" and heatmap.scroll_offset.y > 200
        await pilot.press("m")
        assert heatmap.metric == "mem"


async def test_drill_down_into_a_view_never_visited():
    state = demo_state()
    app = MaasApp(DemoClient(state), state=state, clock=fixed_clock, tick=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.state.connected)
        await pilot.press("colon", *"models", "enter")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen) and app.screen.query(ResourceTable))
        await pilot.press("i")  # llama-3.1-8b's instances: the instances view is composed now
        await until(pilot, lambda: isinstance(app.screen, InstancesScreen) and app.screen.query(ResourceTable)
                    and app.screen.table.row_count == 2)
        assert app.screen.filter_text == "llama-3.1-8b"


def test_rollout_progress_sort_keys_and_bar():
    state = demo_state()
    qwen = state.model_by_name("qwen2.5-7b")
    rollout = state.rollouts()[qwen.id]
    # generation 2: one starting and one pending new instance, one old one still serving
    assert (rollout.generation, rollout.replicas, rollout.updated, rollout.ready, rollout.outdated,
            rollout.available - rollout.ready) == (2, 3, 2, 0, 1, 1)
    assert rollout_in_progress(rollout) and not rollout.complete
    assert not rollout_in_progress(state.rollouts()[state.model_by_name("tiny").id])
    assert fmt.rollout_bar(1, 2, 4, 8).plain == "██▒▒░░░░"
    assert fmt.rollout_bar(0, 0, 0, 4).plain == "░░░░"
    ages = ["2h", "40m", "5s", "3d", "-"]
    assert sorted(ages, key=fmt.sort_key) == ["5s", "40m", "2h", "3d", "-"]
    assert sorted(["18.5G", "4G", "120G"], key=fmt.sort_key) == ["4G", "18.5G", "120G"]


async def test_log_view_timestamps_prefix_arrival_time():
    class LogApp(App[None]):
        def compose(self) -> ComposeResult:
            yield LogView(id="log")

    app = LogApp()
    async with app.run_test(size=(60, 10)) as pilot:
        view = app.query_one(LogView)
        view.replace(["from the tail"])
        view.append(["live line"], "12:00:01")
        view.set_timestamps(True)
        await pilot.pause()
        assert view.render_line(0).text.startswith("········ from the tail")
        assert view.render_line(1).text.startswith("12:00:01 live line")
        view.set_wrap(True)
        view.append(["x" * 70], "12:00:02")
        await pilot.pause()
        assert view.render_line(2).text.startswith("12:00:02 xxx") and view.render_line(3).text.startswith("         x")
        view.set_timestamps(False)
        await pilot.pause()
        assert view.render_line(1).text.startswith("live line")


@pytest.mark.parametrize("source, backend, problem", [
    ("/models/m.gguf", "llama.cpp", None),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", "llama.cpp", None),
    ("Qwen/Qwen2.5-0.5B-Instruct", "vllm", None),
    ("ms://qwen/Qwen2.5-0.5B-Instruct", "vllm", None),
    ("models/m.gguf", "llama.cpp", "absolute path"),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct", "llama.cpp", "one GGUF file"),
    ("hf://nope", "vllm", "write hf://ORG/NAME"),
])
def test_forms_check_sources_as_the_server_does(source: str, backend: str, problem: str | None):
    from maas_tui.tui.forms import source_problem

    found = source_problem(source, backend)
    assert found is None if problem is None else problem in found


def test_downloading_state_shows_its_progress():
    inst = demo_state().instance_by_name("qwen2.5-7b-c0ffee")
    assert inst.state == "downloading" and fmt.instance_state_text(inst).plain == "downloading 42%"
    assert fmt.instance_state("downloading") == "downloading" and fmt.instance_state("running", 0.5) == "running"


def test_worker_describe_lists_nvml_details_when_the_agent_sends_them():
    from rich.console import Console

    from maas_tui.render.workers import gpu_nvml_table

    worker = make_worker(1, "gpu-a01", [("H100-80GB", 80)], simulated=False)
    assert gpu_nvml_table(worker) is None  # nothing beyond the heatmap's values
    gpu = worker.gpus[0].model_copy(update={"uuid": "GPU-4c1f0a9e-8d3b", "power_watts": 312.4, "mig_mode": False,
                                            "processes": [schemas.GPUProcess(pid=4242, used_memory=2 * 10**9),
                                                          schemas.GPUProcess(pid=77, used_memory=None)]})
    console = Console(width=80, record=True, color_system=None)
    console.print(gpu_nvml_table(worker.model_copy(update={"gpus": [gpu]})))
    text = console.export_text()
    assert "312 W" in text and "off" in text and "4242 2.0G, 77" in text and "GPU-4c1f0a9" in text


@pytest.mark.parametrize("remote", [False, True], ids=["local", "over-ssh"])
async def test_over_ssh_the_tui_writes_no_file_on_the_server(tmp_path, monkeypatch, remote: bool):
    """Under the SSH front door (MAAS_TUI_REMOTE) the TUI runs on the server: log save and Textual's
    screenshot would write there, so both are off; locally both work."""
    monkeypatch.chdir(tmp_path)
    state = demo_state()
    app = MaasApp(DemoClient(state, log_lines=50), state=state, clock=fixed_clock, tick=0, remote=remote)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.state.connected)
        app.push_screen(LogsScreen("tiny-2c4e6a", tail=-1))
        await until(pilot, lambda: isinstance(app.screen, LogsScreen) and app.screen.query(LogView)
                    and app.screen.log_view.line_count == 50)
        shown = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled}
        assert ("save" in shown) is not remote
        await pilot.press("ctrl+s")
        if not remote:
            await until(pilot, lambda: bool(list(tmp_path.glob("*.log"))))
        await pilot.pause(0.2)
        assert bool(list(tmp_path.glob("*.log"))) is not remote
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert ("Screenshot" in titles) is not remote
        app.action_screenshot(path=str(tmp_path))
        await pilot.pause(0.2)
        assert bool(list(tmp_path.glob("*.svg"))) is not remote


def test_the_registry_drives_commands_columns_and_help():
    """Every view is reached by its name and aliases; its columns are its renderer's; every key a view
    binds is on the help page (generated from the bindings, nothing written beside them)."""
    import io

    from rich.console import Console

    from maas_tui.render import instances, models, workers
    from maas_tui.tui.modals import help_page
    from maas_tui.tui.views import REGISTRY, VIEWS

    assert list(VIEWS) == ["dash", "workers", "gpus", "models", "instances", "keys", "teams", "events", "audit",
                          "files", "alerts", "usage"]
    for name, spec in REGISTRY.items():
        if spec.navigable:
            assert spec.screen.VIEW == name
            assert all(resolve_command(word) == name for word in (name, *spec.aliases))
    assert REGISTRY["models"].columns == models.COLUMNS + models.WIDE_COLUMNS
    assert REGISTRY["instances"].columns == instances.COLUMNS + instances.WIDE_COLUMNS
    assert REGISTRY["gpus"].columns == workers.GPU_COLUMNS + workers.GPU_WIDE_COLUMNS
    console = Console(width=72, file=io.StringIO(), record=True, color_system=None)
    console.print(help_page())
    page = " ".join(console.export_text().split())
    for spec in REGISTRY.values():
        assert spec.title in page or not spec.key_hints
        for key, what in spec.key_hints:
            assert f"{key} {' '.join(what.split())}" in page, (spec.name, key)
    assert "ctrl+d delete (asks first)" in page and "ctrl+s save to a file" in page


async def test_server_text_is_shown_as_typed_not_as_markup():
    """A message quoting the server (a notification, a form's error) is never read as Rich markup: `[red]`
    shows as typed, and a stray `[/]` cannot crash the app."""
    import io

    from rich.console import Console

    from maas_tui.tui.forms import ScaleForm

    state = demo_state()
    app = MaasApp(DemoClient(state), state=state, clock=fixed_clock, tick=0)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.state.connected)
        app.notify("model '[red]boom[/red]' refused [/]", severity="error")
        form = ScaleForm("tiny", 1)
        app.push_screen(form)
        await until(pilot, lambda: app.screen is form and bool(form.query("#status")))
        form.set_status("the server refused: [bold]x[/bold] [/]")
        await pilot.pause(0.2)
        console = Console(width=100, height=30, file=io.StringIO(), record=True, color_system=None)
        console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
        shown = console.export_text()
        assert "[bold]x[/bold] [/]" in shown, shown
        toasts = [n for n in app._notifications if "boom" in n.message]
        assert toasts and not toasts[0].markup  # Textual shows it as plain text


async def test_enter_on_a_key_describes_it():
    """Every kind the TUI lists has a describe page (keys too, from render.keys, as `maas key describe`)."""
    import io

    from rich.console import Console

    from maas_tui.tui.views import DescribeScreen

    state = demo_state()
    app = MaasApp(DemoClient(state), state=state, clock=fixed_clock, tick=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.state.connected)
        app.navigate("keys")
        await until(pilot, lambda: bool(app.state.keys) and bool(app.screen.query(ResourceTable))
                    and app.screen.query_one(ResourceTable).row_count > 0)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DescribeScreen))
        await pilot.pause(0.1)
        first = sorted(app.state.keys, key=lambda k: k.name)[0]
        assert app.screen.kind == "key" and app.screen.find() is first
        console = Console(width=80, height=24, file=io.StringIO(), record=True, color_system=None)
        console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
        shown = console.export_text()
        assert "Prefix" in shown and first.prefix in shown and "Scopes" in shown, shown
