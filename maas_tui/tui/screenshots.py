"""Every screen of the TUI as a scenario on the SIMULATED demo cluster (fixed data, fixed clock).

The snapshot tests (tests/test_tui_snapshots.py) and `make screenshots` render the same
scenarios the same way (Textual's `take_svg_screenshot`, as pytest-textual-snapshot does):

    python -m maas_tui.tui.screenshots [OUTPUT_DIR]      # default: screenshots/
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from maas_tui.client import ServerUnreachable
from maas_tui.tui.app import MaasApp
from maas_tui.tui.demo import DemoClient, demo_state, fixed_clock

SIZE = (80, 24)


class UnreachableDemoClient(DemoClient):
    """The demo cluster after its server went away: the watch cannot reconnect."""

    async def health(self) -> dict[str, Any]:
        raise ServerUnreachable(self.server, "Connect call failed ('127.0.0.1', 8080)")

    async def watch(self, kinds: list[str], since: int | None = None):
        raise ServerUnreachable(self.server, "Connect call failed ('127.0.0.1', 8080)")
        yield  # pragma: no cover - makes this an async generator


@dataclass
class Scenario:
    name: str
    description: str
    keys: list[str] = field(default_factory=list)
    wait: Callable[[MaasApp], bool] | None = None
    no_color: bool = False
    unreachable: bool = False


def type_keys(text: str) -> list[str]:
    return list(text)


def _screen_is(name: str) -> Callable[[MaasApp], bool]:
    return lambda app: type(app.screen).__name__ == name


def _logs_loaded(app: MaasApp) -> bool:
    from maas_tui.tui.views import LogsScreen

    return isinstance(app.screen, LogsScreen) and app.screen.log_view.line_count >= 400


SCENARIOS: list[Scenario] = [
    Scenario("dashboard", "GPU heatmap (utilisation), host CPU/RAM bars, the selected worker's GPU history"),
    Scenario("dashboard-memory", "heatmap by memory used (m), cursor on gpu-a02", ["down", "down", "m"]),
    Scenario("workers", ":workers", ["colon", *type_keys("wo"), "enter"], _screen_is("WorkersScreen")),
    Scenario("gpus", ":gpus: every GPU with its claims", ["colon", *type_keys("gpu"), "enter"],
             _screen_is("GpusScreen")),
    Scenario("models", ":models: ready/desired replicas", ["colon", *type_keys("mo"), "enter"],
             _screen_is("ModelsScreen")),
    Scenario("gpu-history", "enter on a GPU: its last hour on this server (braille graphs from GET /v2/telemetry)",
             ["colon", *type_keys("gpu"), "enter", "down", "enter"],
             lambda app: getattr(app.screen, "history", None) is not None),
    Scenario("model-describe", "enter on a model: requests/s history, tokens/s, latency and memory used against the "
             "claim (a suggested --memory where it drifts), then the spec, instances and events",
             ["colon", *type_keys("mo"), "enter", "enter"],
             lambda app: getattr(app.screen, "activity", None) is not None),
    Scenario("deploy-form-invalid", "the deploy form refusing bad input (nothing is sent)",
             ["colon", *type_keys("mo"), "enter", "n", *type_keys("bad name!"), "tab", *type_keys("model.gguf"),
              "ctrl+s"], _screen_is("DeployForm")),
    Scenario("deploy-preview", "ctrl+r in the deploy form: a dry run of where the replicas would go",
             ["colon", *type_keys("mo"), "enter", "n", *type_keys("qwen-14b"), "tab", *type_keys("/models/q14.gguf"),
              "tab", "tab", "backspace", "3", "ctrl+r"],
             lambda app: "Preview" in getattr(app.screen, "status_text", "")),
    Scenario("model-edit-invalid", "e on a model: the edit form (a spec change is a rollout) refusing bad input",
             ["colon", *type_keys("mo"), "enter", "down", "down", "e", "tab", "ctrl+a", "ctrl+k", *type_keys("lots"), "tab",
              "tab", "ctrl+a", "ctrl+k", "0", "tab", "ctrl+a", "ctrl+k", "0", "ctrl+s"],
             lambda app: "nothing was sent" in getattr(app.screen, "status_text", "")
             and getattr(app.focused, "id", None) == "context"),
    Scenario("model-history", "h on a model: its revisions; enter rolls back to one",
             ["colon", *type_keys("mo"), "enter", "down", "down", "h"], _screen_is("HistoryScreen")),
    Scenario("rollout-undo-confirm", "u on a model mid-rollout: confirm the roll back",
             ["colon", *type_keys("mo"), "enter", "down", "down", "u"], _screen_is("ConfirmScreen")),
    Scenario("worker-drain-confirm", "d on a worker: drain asks first",
             ["colon", *type_keys("wo"), "enter", "down", "d"], _screen_is("ConfirmScreen")),
    Scenario("workers-sorted", "o o o o o O: workers sorted by GPU utilisation, highest first",
             ["colon", *type_keys("wo"), "enter", "o", "o", "o", "o", "o", "o", "O"], _screen_is("WorkersScreen")),
    Scenario("instances-wide", "ctrl+w on instances: wide mode adds model, generation, address, PID",
             ["colon", *type_keys("in"), "enter", "ctrl+w", "right", "right", "right", "right", "right", "right"],
             _screen_is("InstancesScreen")),
    Scenario("instances", ":instances, the pending one highlighted with why it is not scheduled",
             ["colon", *type_keys("in"), "enter", "down", "down", "down"], _screen_is("InstancesScreen")),
    Scenario("instance-describe", "enter on an instance: placement, claim, port, reasons, events",
             ["colon", *type_keys("in"), "enter", "down", "down", "down", "enter"],
             lambda app: getattr(app.screen, "activity", None) is not None),  # its history fetched
    Scenario("logs", "l on an instance: follow, search highlight",
             ["colon", *type_keys("in"), "enter", "l", "slash", *type_keys("slot 2"), "enter"], _logs_loaded),
    Scenario("logs-timestamps", "T in the logs: the time each line arrived (·· for the tail fetched on opening)",
             ["colon", *type_keys("in"), "enter", "l", "T"], _logs_loaded),
    Scenario("keys", ":keys", ["colon", *type_keys("key"), "enter"], _screen_is("KeysScreen")),
    Scenario("key-created", "a new key: the secret is shown once",
             ["colon", *type_keys("key"), "enter", "n", *type_keys("ci-bot"), "enter"], _screen_is("SecretScreen")),
    Scenario("teams", ":teams: members, and used/limit per quota (yellow: used up)",
             ["colon", *type_keys("team"), "enter"], _screen_is("TeamsScreen")),
    Scenario("team-describe", "enter on a team: its members, and per quota what is used, the limit and what is left",
             ["colon", *type_keys("team"), "enter", "down", "down", "enter"], _screen_is("DescribeScreen")),
    Scenario("audit", ":audit: every change made through the API, newest first (admins only)",
             ["colon", *type_keys("au"), "enter"], _screen_is("AuditScreen")),
    Scenario("alerts", ":alerts: firing first (critical red, warning yellow, silenced dim), then resolved",
             ["colon", *type_keys("alerts"), "enter"],
             lambda app: type(app.screen).__name__ == "AlertsScreen" and bool(app.state.alerts)),
    Scenario("files", ":files: model files in the workers' caches (pulling, ready, error), the error highlighted",
             ["colon", *type_keys("files"), "enter", "down", "down", "down", "down"], _screen_is("FilesScreen")),
    Scenario("events", ":events: the live event stream", ["colon", *type_keys("ev"), "enter"],
             _screen_is("EventsScreen")),
    Scenario("usage", ":usage: requests and tokens per model by hour (sparklines), the line under: sums and routes",
             ["colon", *type_keys("usage"), "enter"],
             lambda app: type(app.screen).__name__ == "UsageScreen" and bool(app.state.usage)),
    Scenario("filter", "/!qwen on models: a negated filter", ["colon", *type_keys("mo"), "enter", "slash",
                                                              *type_keys("!qwen"), "enter"], _screen_is("ModelsScreen")),
    Scenario("models-autoscale", ":models on an autoscaled model: desired vs running and the last scaling decision",
             ["colon", *type_keys("mo"), "enter", "down", "down", "down"], _screen_is("ModelsScreen")),
    Scenario("command-line", "the : command line completing 'in' to instances", ["colon", "i", "n"]),
    Scenario("help", "? shows every key", ["question_mark"], _screen_is("HelpScreen")),
    Scenario("disconnected", "the server went away: last data kept, reconnecting", unreachable=True),
    Scenario("no-color", "the dashboard with NO_COLOR set", no_color=True),
]

if not hasattr(DemoClient, "evaluate_model"):  # a build without the dry run (POST /v2/models/evaluate)
    SCENARIOS = [s for s in SCENARIOS if s.name != "deploy-preview"]

BY_NAME = {s.name: s for s in SCENARIOS}


def make_app(scenario: Scenario) -> MaasApp:
    state = demo_state()
    client = (UnreachableDemoClient if scenario.unreachable else DemoClient)(state, server="https://maas.example:8080")
    if scenario.no_color:
        os.environ["NO_COLOR"] = "1"  # Textual reads (and removes) it when the app is created
    try:
        return MaasApp(client, state=state, clock=fixed_clock, refresh_delay=0.0, tick=0, toast_seconds=600)
    finally:
        os.environ.pop("NO_COLOR", None)


async def until(pilot: Any, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Let the app run until `predicate()` holds; a bounded wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.02)


def runner(scenario: Scenario) -> Callable[[Any], Awaitable[None]]:
    async def run_before(pilot: Any) -> None:
        app: MaasApp = pilot.app
        if scenario.unreachable:
            await until(pilot, lambda: bool(app.state.error), what="the watch to fail")
        else:
            await until(pilot, lambda: app.state.connected, what="the demo stream")
        for key in scenario.keys:
            await pilot.press(key)
        if scenario.wait is not None:
            await until(pilot, lambda: scenario.wait(app), what=f"scenario {scenario.name}")
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        from textual.widgets import Input

        for field in app.screen.query(Input):  # a blinking cursor would make the picture depend on timing
            field.cursor_blink = False
        app.mark_dirty({"clock"})
        app.flush()
        await pilot.pause()

    return run_before


def render(scenario: Scenario) -> str:
    from textual._doc import take_svg_screenshot

    return take_svg_screenshot(app=make_app(scenario), terminal_size=SIZE, run_before=runner(scenario),
                               title=f"maas tui — {scenario.name}")


def stable(svg: str) -> str:
    """Drop the random id Rich puts in every export, so unchanged screens give unchanged files."""
    return re.sub(r"\bterminal-\d+-([\w-]+)", r"terminal-\1", svg)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    for scenario in SCENARIOS:
        path = out / f"{scenario.name}.svg"
        path.write_text(stable(render(scenario)))
        print(f"{path}  {scenario.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
