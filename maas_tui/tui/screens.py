"""The screens: every view shares the header, the `:`/`/` prompt and the footer.

Views (dash, workers, gpus, models, instances, keys, events) are installed once and switched
between, so each keeps its cursor and filter. Describe and logs screens are pushed on top;
`esc` pops them. The app calls `refresh_view()` on the visible screen when the state changed.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import aiohttp
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Input, Static

from maas_tui.client import ApiClientError
from maas_tui.render import format as fmt
from maas_tui.tui.logs import LogView
from maas_tui.tui.state import ClusterState, Rollout
from maas_tui.tui.widgets import METRICS, ClusterHeader, GpuHeatmap, KeyFooter, PromptBar, ResourceTable, gpu_detail, \
    gpu_nvml_table, resolve_command, set_content
from server import schemas

if TYPE_CHECKING:
    from maas_tui.tui.app import MaasApp


class MaasScreen(Screen):
    VIEW: ClassVar[str] = ""
    BINDINGS = [
        Binding("colon", "command", "Cmd", key_display=":"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("escape", "back", "Back", show=False),
    ]

    app: "MaasApp"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield ClusterHeader(self.header_label(), id="header")
        yield Static(id="title", classes="title")
        yield from self.compose_body()
        with Horizontal(id="prompt-row"):
            yield Static(":", id="prompt-label")
            yield PromptBar(id="prompt")
            yield Static("tab completes · enter · esc", id="prompt-hint")
        yield KeyFooter(compact=True, show_command_palette=False)

    def compose_body(self) -> ComposeResult:  # pragma: no cover - overridden
        yield from ()

    def header_label(self) -> str:
        return self.VIEW

    @property
    def state(self) -> ClusterState:
        return self.app.state

    @property
    def now(self) -> datetime:
        return self.app.clock()

    def main_widget(self) -> Any:
        return None

    def on_mount(self) -> None:
        self.query_one(PromptBar).close()
        self.refresh_view()
        widget = self.main_widget()
        if widget is not None:
            widget.focus()

    def on_screen_resume(self) -> None:
        self.refresh_view()
        widget = self.main_widget()
        if widget is not None and not self.query_one(PromptBar).is_open:
            widget.focus()

    def refresh_view(self, kinds: set[str] | None = None) -> None:
        headers = self.query(ClusterHeader)
        if not headers:  # not composed yet: on_mount refreshes
            return
        headers.first().show(self.state, self.app.server)
        self.refresh_body(kinds)

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        pass

    def set_title(self, name: str, count: int | None = None, extra: str = "") -> None:
        title = Text()
        title.append(f" {name}", style="bold")
        if count is not None:
            title.append(f"[{count}]", style="bold cyan")
        if self.filter_text:
            title.append("  filter ", style="dim")
            title.append(f"/{self.filter_text}", style="bold yellow")
        if extra:
            title.append("  ")
            title.append_text(Text.from_markup(extra) if "[" in extra else Text(extra, style="dim"))
        set_content(self.query_one("#title", Static), title)

    # --- prompt: `:` commands and `/` filter --------------------------------------------------

    def action_command(self) -> None:
        self.query_one(PromptBar).open("command")

    def action_filter(self) -> None:
        self.query_one(PromptBar).open("filter", self.filter_text)

    def action_help(self) -> None:
        self.app.navigate("help")

    def action_back(self) -> None:
        prompt = self.query_one(PromptBar)
        if prompt.is_open:
            if prompt.mode == "filter":
                self.set_filter("")
            self.close_prompt()
            return
        if self.filter_text:
            self.set_filter("")
            return
        self.app.back()

    def close_prompt(self) -> None:
        self.query_one(PromptBar).close()
        widget = self.main_widget()
        if widget is not None:
            widget.focus()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        if self.query(ClusterHeader):
            self.refresh_body(None)

    @on(Input.Changed, "#prompt")
    def prompt_changed(self, event: Input.Changed) -> None:
        prompt = self.query_one(PromptBar)
        if prompt.mode == "filter":
            self.set_filter(event.value)
        elif prompt.mode == "search":
            self.search_changed(event.value)
        event.stop()

    @on(Input.Submitted, "#prompt")
    def prompt_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        prompt = self.query_one(PromptBar)
        mode, value = prompt.mode, event.value
        self.close_prompt()
        if mode == "command":
            target = resolve_command(value)
            if target is None:
                if value.strip():
                    self.app.notify(f"unknown command {value.strip()!r}: try dash, workers, gpus, models, "
                                    "instances, keys, events, help, quit", severity="warning")
                return
            self.app.navigate(target)
        elif mode == "search":
            self.search_submitted(value)

    def search_changed(self, value: str) -> None:
        pass

    def search_submitted(self, value: str) -> None:
        pass

    def visible(self, *parts: Any) -> bool:
        if not self.filter_text.strip():
            return True
        return fmt.matches(self.filter_text, " ".join(p.plain if isinstance(p, Text) else str(p) for p in parts))


# --- dashboard ------------------------------------------------------------------------------


class DashboardScreen(MaasScreen):
    VIEW = "dash"
    BINDINGS = [Binding("m", "metric", "Metric")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric = "util"

    def compose_body(self) -> ComposeResult:
        yield GpuHeatmap(id="heatmap")
        yield Static(id="gpu-detail")

    def main_widget(self) -> Any:
        return self.query_one(GpuHeatmap)

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        if kinds is not None and not kinds & {"workers", "instances"}:
            return
        workers = self.state.sorted_workers()
        rows = workers if not self.filter_text.strip() else [
            w for w in workers
            if self.visible(w.name, w.state, " ".join(g.name for g in w.gpus), " ".join(w.labels.values()))]
        heatmap = self.query_one(GpuHeatmap)
        heatmap.set_rows(self.state, rows, self.metric)
        legend = " ".join(f"[{fmt.percent_color(v)}]█[/]{label}" for v, label in
                          ((0, "<10"), (20, "<30"), (40, "<50"), (60, "<70"), (80, "<85"), (90, "≥85")))
        self.set_title("GPU heatmap", len(rows), f"[b]{METRICS[self.metric]}[/b] [dim](m)[/dim]  {legend}")
        self.update_detail()

    def update_detail(self) -> None:
        heatmap = self.query_one(GpuHeatmap)
        detail = self.query_one("#gpu-detail", Static)
        text = gpu_detail(self.state, heatmap.current, self.size.width or 80)
        height = min(10, text.plain.count("\n") + 2)  # + the border line
        if detail.styles.height is None or detail.styles.height.value != height:
            detail.styles.height = height
        set_content(detail, text)

    @on(GpuHeatmap.Highlighted)
    def highlighted(self) -> None:
        self.update_detail()

    @on(GpuHeatmap.Selected)
    def selected(self, event: GpuHeatmap.Selected) -> None:
        self.app.describe("worker", event.worker.name)

    def action_metric(self) -> None:
        order = list(METRICS)
        self.metric = order[(order.index(self.metric) + 1) % len(order)]
        self.refresh_body(None)


# --- tables -----------------------------------------------------------------------------------


class TableScreen(MaasScreen):
    """A live table. `rows()` yields every cell, the wide-mode ones (WIDE_COLUMNS) last; `o` cycles the
    sort column (the default order, then each column), `O` reverses it, ctrl+w toggles wide mode."""

    TITLE_TEXT: ClassVar[str] = ""
    COLUMNS: ClassVar[list[tuple[str, int | None]]] = []
    WIDE_COLUMNS: ClassVar[list[tuple[str, int | None]]] = []
    KINDS: ClassVar[set[str]] = set()
    BINDINGS = [
        Binding("o", "sort", "Sort", show=False),
        Binding("O", "sort_reverse", "Reverse", show=False),
        Binding("ctrl+w", "wide", "Wide", show=False),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sort_column: int | None = None
        self.sort_reverse = False
        self.wide = False

    def compose_body(self) -> ComposeResult:
        yield ResourceTable(self.columns(), id="table")

    def columns(self) -> list[tuple[str, int | None]]:
        columns = list(self.COLUMNS) + (list(self.WIDE_COLUMNS) if self.wide else [])
        if self.sort_column is not None and self.sort_column < len(columns):
            label, cap = columns[self.sort_column]
            columns[self.sort_column] = (label + ("↓" if self.sort_reverse else "↑"), cap)
        return columns

    def action_sort(self) -> None:
        count = len(self.COLUMNS) + (len(self.WIDE_COLUMNS) if self.wide else 0)
        self.sort_column = 0 if self.sort_column is None else self.sort_column + 1
        if self.sort_column >= count:
            self.sort_column = None
        self.sort_reverse = False
        self._resort()

    def action_sort_reverse(self) -> None:
        if self.sort_column is None:
            self.sort_column = 0
        self.sort_reverse = not self.sort_reverse
        self._resort()

    def action_wide(self) -> None:
        self.wide = not self.wide
        if not self.wide and self.sort_column is not None and self.sort_column >= len(self.COLUMNS):
            self.sort_column = None
        self._resort()

    def _resort(self) -> None:
        self.table.set_columns(self.columns())
        self.refresh_body(None)
        label = "default order" if self.sort_column is None else \
            f"sorted by {self.columns()[self.sort_column][0]}"
        self.app.notify(f"{label}{' · wide' if self.wide else ''}", timeout=1.5)

    def main_widget(self) -> Any:
        return self.query_one(ResourceTable)

    @property
    def table(self) -> ResourceTable:
        return self.query_one(ResourceTable)

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:  # pragma: no cover - overridden
        return []

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        if kinds is not None and not kinds & self.KINDS:
            return
        count = len(self.COLUMNS) + (len(self.WIDE_COLUMNS) if self.wide else 0)
        rows = [(key, cells[:count]) for key, cells in self.rows() if self.visible(*cells)]
        if self.sort_column is not None:
            column = self.sort_column
            keyed = [(fmt.sort_key(cells[column]) if column < len(cells) else (2, 0.0, ""), key, cells)
                     for key, cells in rows]
            keyed.sort(key=lambda item: item[0], reverse=self.sort_reverse)
            # Rows without a value ("-") stay last either way.
            rows = [(k, c) for sk, k, c in keyed if sk[0] != 2] + [(k, c) for sk, k, c in keyed if sk[0] == 2]
        self.table.sync(rows)
        self.set_title(self.TITLE_TEXT, len(rows), self.title_extra())

    def title_extra(self) -> str:
        return ""

    def select_key(self, key: str) -> None:
        table = self.table
        if key in table._keys:
            table.move_cursor(row=table._keys.index(key))

    @on(ResourceTable.RowSelected)
    def row_selected(self, event: ResourceTable.RowSelected) -> None:
        event.stop()
        self.describe(event.key)

    def describe(self, key: str) -> None:
        pass


class WorkersScreen(TableScreen):
    VIEW = "workers"
    TITLE_TEXT = "Workers"
    KINDS = {"workers", "instances"}
    COLUMNS = [("NAME", None), ("STATE", None), ("GPUS", None), ("VRAM USED", None), ("CLAIMED", None),
               ("UTIL", None), ("CPU", None), ("RAM", None), ("BEAT", None)]
    WIDE_COLUMNS = [("ADDRESS", None), ("INSTANCES", None), ("LABELS", 40), ("AGE", None)]
    BINDINGS = [Binding("c", "cordon", "Cordon"), Binding("d", "drain", "Drain"),
                Binding("ctrl+d", "delete", "Remove")]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        state, now = self.state, self.now
        for w in state.sorted_workers():
            gpus = w.gpus
            sim = " sim" if any(g.simulated for g in gpus) else ""
            used = sum(g.memory_used for g in gpus)
            total = sum(g.memory_total for g in gpus)
            claimed = sum(state.claimed_bytes(w.id, g.index) for g in gpus)
            util = sum(g.utilization for g in gpus) / len(gpus) if gpus else None
            ram = f"{fmt.gb(w.host.memory_used)}/{fmt.gb(w.host.memory_total)}G"
            state_cell = fmt.state_text(w.state)
            if w.draining:
                state_cell.append(",draining", style="bold yellow")
            elif w.cordoned:
                state_cell.append(",cordoned", style="yellow")
            yield w.name, (
                w.name, state_cell, f"{len(gpus)}{sim}",
                f"{fmt.gb(used)}/{fmt.gb(total)}G" if gpus else "-",
                f"{fmt.gb(claimed, 1)}G" if claimed else "-",
                f"{util:.0f}%" if util is not None else "-",
                f"{w.host.cpu_percent:.0f}%", ram, fmt.age(w.last_heartbeat_at, now),
                f"{w.address}:{w.agent_port}", str(len(state.instances_on(w.id))) if self.wide else "",
                ",".join(f"{k}={v}" for k, v in sorted(w.labels.items())) or "-", fmt.age(w.created_at, now))

    def describe(self, key: str) -> None:
        self.app.describe("worker", key)

    def action_delete(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.remove_worker(key)

    def action_cordon(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.cordon_worker(key)

    def action_drain(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.drain_worker(key)


class GpusScreen(TableScreen):
    VIEW = "gpus"
    TITLE_TEXT = "GPUs"
    KINDS = {"workers", "instances"}
    COLUMNS = [("WORKER", None), ("GPU", None), ("NAME", None), ("UTIL", None), ("MEM USED", None),
               ("CLAIMED", None), ("TEMP", None), ("INSTANCES", None)]
    WIDE_COLUMNS = [("VENDOR", None), ("UUID", None)]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        state = self.state
        claims = state.gpu_claims()
        for w in state.sorted_workers():
            for g in w.gpus:
                holders = claims.get((w.id, g.index), [])
                claimed = sum(i.claim.vram_bytes_per_gpu for i in holders if i.claim)
                name = fmt.truncate(g.name.replace(" (simulated)", ""), 16)
                name_cell = name + " sim" if g.simulated else name
                util = Text(f"{g.utilization:>3.0f}%", style=fmt.cell_style(g.utilization))
                yield f"{w.name}/{g.index}", (
                    w.name, str(g.index), name_cell, util, f"{fmt.gb(g.memory_used)}/{fmt.gb(g.memory_total)}G",
                    f"{fmt.gb(claimed, 1)}G" if holders else "-",
                    f"{g.temperature:.0f}°C" if g.temperature is not None else "-",
                    fmt.truncate(",".join(i.name for i in holders) or "-", 18), g.vendor,
                    g.uuid or "-")

    def describe(self, key: str) -> None:
        self.app.describe("worker", key.rsplit("/", 1)[0])


class ModelsScreen(TableScreen):
    VIEW = "models"
    TITLE_TEXT = "Models"
    KINDS = {"models", "instances"}
    COLUMNS = [("NAME", None), ("READY", None), ("STATE", None), ("GEN", None), ("ROLLOUT", None),
               ("SOURCE", 20), ("AGE", None)]
    WIDE_COLUMNS = [("BACKEND", None), ("CTX", None), ("SURGE/UNAV", None), ("ARGS", 40)]
    BINDINGS = [
        Binding("n", "deploy", "Deploy"),
        Binding("s", "scale", "Scale"),
        Binding("e", "edit", "Edit"),
        Binding("r", "restart", "Restart"),
        Binding("u", "undo", "Undo"),
        Binding("p", "pause", "Pause"),
        Binding("h", "history", "History"),
        Binding("plus", "nudge(1)", "+1", show=False),
        Binding("minus", "nudge(-1)", "-1", show=False),
        Binding("i", "instances", "Instances"),
        Binding("ctrl+d", "delete", "Delete"),
    ]

    def compose_body(self) -> ComposeResult:
        yield from super().compose_body()
        yield Static(id="row-detail")

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        ready = self.state.ready_counts()
        rollouts = self.state.rollouts()
        now = self.now
        for m in self.state.sorted_models():
            count = ready[m.id]
            ready_text = Text(f"{count}/{m.replicas}",
                              style="green" if count >= m.replicas else ("yellow" if count else "red"))
            yield m.name, (m.name, ready_text, fmt.state_text(m.state), str(m.generation),
                           rollout_cell(rollouts.get(m.id)), fmt.middle_truncate(m.spec.source, 20),
                           fmt.age(m.created_at, now), m.spec.backend, str(m.spec.context_length),
                           f"{m.max_surge}/{m.max_unavailable}", " ".join(m.spec.args) or "-")

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        super().refresh_body(kinds)
        self.update_row_detail()

    @on(ResourceTable.RowHighlighted)
    def update_row_detail(self) -> None:
        """The highlighted model's rollout in words: new vs old generation, paused, why it stalled."""
        model = self._model()
        rollout = self.state.rollouts().get(model.id) if model else None
        text = Text()
        if model is not None and rollout is not None:
            text.append(f" {model.name} ", style="bold")
            text.append_text(rollout_text(rollout))
        set_content(self.query_one("#row-detail", Static), text, layout=True)

    def describe(self, key: str) -> None:
        self.app.describe("model", key)

    def _model(self) -> schemas.ModelOut | None:
        key = self.table.selected_key
        return self.state.model_by_name(key) if key else None

    def action_deploy(self) -> None:
        self.app.deploy()

    def action_scale(self) -> None:
        if (model := self._model()) is not None:
            self.app.scale(model.name, model.replicas)

    def action_edit(self) -> None:
        if (model := self._model()) is not None:
            self.app.edit_model(model.name)

    def action_restart(self) -> None:
        if (model := self._model()) is not None:
            self.app.rollout_restart(model.name)

    def action_undo(self) -> None:
        if (model := self._model()) is not None:
            self.app.rollout_undo(model.name)

    def action_pause(self) -> None:
        if (model := self._model()) is not None:
            self.app.rollout_pause(model.name, not model.paused)

    def action_history(self) -> None:
        if (model := self._model()) is not None:
            self.app.model_history(model.name)

    def action_nudge(self, delta: int) -> None:
        if (model := self._model()) is not None:
            self.app.scale_to(model.name, max(0, model.replicas + delta))

    def action_instances(self) -> None:
        if (model := self._model()) is not None:
            self.app.navigate("instances", filter_text=model.name)

    def action_delete(self) -> None:
        if (model := self._model()) is not None:
            self.app.delete_model(model.name)


def rollout_cell(rollout: Rollout | None) -> Text:
    """The ROLLOUT column: `done`, or a bar of the new generation's progress with the old count."""
    if rollout is None:
        return Text("-", style="dim")
    if not rollout.in_progress:
        return Text("-", style="dim")
    cell = Text()
    if rollout.paused:
        cell.append("‖ ", style="bold yellow")
    elif rollout.message:
        cell.append("⚠ ", style="bold red")
    cell.append_text(fmt.rollout_bar(rollout.ready, rollout.updated, rollout.desired))
    cell.append(f" {rollout.ready}/{rollout.desired}")
    if rollout.outdated:
        cell.append(f" old {rollout.outdated}", style="dim")
    return cell


def rollout_text(rollout: Rollout) -> Text:
    """A rollout in words, for the detail line and describe."""
    text = Text()
    if not rollout.in_progress:
        text.append(f"generation {rollout.generation}: no rollout in progress · {rollout.ready}/{rollout.desired} "
                    "ready", style="dim")
        return text
    text.append(f"rollout to gen {rollout.generation}: ", style="bold")
    text.append_text(fmt.rollout_bar(rollout.ready, rollout.updated, rollout.desired, 8))
    text.append(f" {rollout.updated}/{rollout.desired} new, {rollout.ready} ready")
    if rollout.outdated:
        text.append(f" · old {rollout.outdated} ({rollout.old_ready} serving)", style="dim")
    if rollout.paused:
        text.append(" · PAUSED (p resumes)", style="bold yellow")
    if rollout.message:
        text.append(f"\n ⚠ {rollout.message}", style="bold red")
    return text


def placement(inst: schemas.InstanceOut) -> str:
    claim = inst.claim
    if claim is None:
        return "-"
    if claim.device == "gpu":
        return f"gpu{','.join(map(str, claim.gpu_indexes))} {fmt.gb(claim.vram_bytes_per_gpu, 1)}G"
    return f"cpu {fmt.human_bytes(claim.ram_bytes)}"


class InstancesScreen(TableScreen):
    VIEW = "instances"
    TITLE_TEXT = "Instances"
    KINDS = {"instances"}
    COLUMNS = [("NAME", None), ("STATE", None), ("WORKER", None), ("PLACEMENT", None), ("PORT", None),
               ("RST", None), ("AGE", None)]  # RST: restarts, as in the model view (80 columns)
    WIDE_COLUMNS = [("MODEL", None), ("GEN", None), ("ADDRESS", None), ("PID", None)]
    BINDINGS = [Binding("l", "logs", "Logs"), Binding("r", "restart", "Restart"), Binding("ctrl+d", "delete", "Delete")]

    def compose_body(self) -> ComposeResult:
        yield from super().compose_body()
        yield Static(id="row-detail")

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        now = self.now
        for i in self.state.sorted_instances():
            yield i.name, (i.name, fmt.instance_state_text(i), i.worker_name or "-", placement(i),
                           str(i.port) if i.port else "-", str(i.restart_count), fmt.age(i.created_at, now),
                           i.model_name, str(i.generation), i.address or "-", str(i.pid) if i.pid else "-")

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        super().refresh_body(kinds)
        self.update_row_detail()

    @on(ResourceTable.RowHighlighted)
    def update_row_detail(self) -> None:
        """The highlighted instance's reason, in full, under the table (the describe pane has the rest)."""
        key = self.table.selected_key
        inst = self.state.instance_by_name(key) if key else None
        text = Text()
        if inst is not None:
            text.append(f" {inst.name} ", style="bold")
            text.append_text(fmt.instance_state_text(inst))
            if inst.state_message:
                text.append(": " + " ".join(inst.state_message.split())[:300],
                            style="red" if inst.state == "error" else "")
            elif inst.schedule_reasons:
                reasons = "; ".join(f"{r.worker or 'all'}: {r.message}" for r in inst.schedule_reasons)
                text.append(f": not scheduled: {reasons}"[:300], style="yellow")
            elif inst.state == "running":
                text.append(f" on {inst.worker_name} at {inst.address}:{inst.port}", style="dim")
        set_content(self.query_one("#row-detail", Static), text, layout=True)

    def describe(self, key: str) -> None:
        self.app.describe("instance", key)

    def action_logs(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.show_logs(key)

    def action_delete(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.delete_instance(key)

    def action_restart(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.restart_instance(key)


class KeysScreen(TableScreen):
    VIEW = "keys"
    TITLE_TEXT = "API keys"
    KINDS = {"keys"}
    COLUMNS = [("NAME", None), ("PREFIX", None), ("CREATED", None), ("EXPIRES", None), ("LAST USED", None)]
    BINDINGS = [Binding("n", "create", "Create"), Binding("ctrl+d", "revoke", "Revoke"),
                Binding("ctrl+r", "reload", "Reload", show=False)]

    # Textual also runs MaasScreen's handlers for these events (base-class handlers are not overridden).
    def on_screen_resume(self) -> None:
        self.app.load_keys()

    def on_mount(self) -> None:
        self.app.load_keys()

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        now = self.now
        for k in sorted(self.state.keys, key=lambda k: k.name):
            expires = "never" if k.expires_at is None else (
                "expired" if fmt.aware(k.expires_at) <= fmt.aware(now) else "in " + fmt.age(now, k.expires_at))
            yield k.name, (k.name, k.prefix + "…", fmt.age(k.created_at, now) + " ago", expires,
                           fmt.age(k.last_used_at, now) + " ago" if k.last_used_at else "never")

    def title_extra(self) -> str:
        return "secrets are shown once, at creation"

    def describe(self, key: str) -> None:
        self.app.notify(f"key {key}: the secret was shown once at creation; revoke with ctrl+d")

    def action_create(self) -> None:
        self.app.create_key()

    def action_revoke(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.revoke_key(key)

    def action_reload(self) -> None:
        self.app.load_keys()


class EventsScreen(TableScreen):
    VIEW = "events"
    TITLE_TEXT = "Events"
    KINDS = {"events"}
    COLUMNS = [("AGE", None), ("KIND", None), ("OBJECT", None), ("REASON", None), ("BY", None), ("MESSAGE", None)]
    SHOWN = 500

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        now = self.now
        events = list(self.state.events)[-self.SHOWN:]
        for e in reversed(events):
            reason = Text(e.reason, style="bold red" if e.reason.lower() in {"error", "failed", "unreachable",
                                                                            "notready", "unschedulable"} else "")
            yield str(e.id), (fmt.age(e.created_at, now), e.kind.rstrip("s"), fmt.truncate(e.object_name, 20), reason,
                              fmt.truncate(e.actor, 10), fmt.truncate(" ".join(e.message.split()), 120))

    def title_extra(self) -> str:
        return "newest first · live"

    def describe(self, key: str) -> None:
        event = next((e for e in self.state.events if str(e.id) == key), None)
        if event is None:
            return
        kind = {"models": "model", "instances": "instance", "workers": "worker"}.get(event.kind)
        if kind:
            self.app.describe(kind, event.object_name)


# --- describe ---------------------------------------------------------------------------------


class DescribeScreen(MaasScreen):
    """`maas ... describe` as a live screen: the object's fields, related objects, recent events."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("l", "logs", "Logs"),
        Binding("s", "scale", "Scale"),
        Binding("e", "edit", "Edit"),
        Binding("r", "restart", "Restart"),
        Binding("ctrl+d", "delete", "Delete"),
    ]

    def __init__(self, kind: str, name: str) -> None:
        super().__init__()
        self.kind = kind
        self.name_ = name
        self._last: Any = None

    def header_label(self) -> str:
        return f"{self.kind} {self.name_}"

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="describe-scroll"):
            yield Static(id="describe")

    def main_widget(self) -> Any:
        return self.query_one("#describe-scroll")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "logs":
            return self.kind == "instance"
        if action in ("scale", "edit"):
            return self.kind == "model"
        if action == "restart":
            return self.kind in ("model", "instance")
        if action == "delete":
            return self.kind in ("instance", "model", "worker")
        return True

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        obj = self.find()
        if obj is not None:
            self._last = obj
        self.set_title(f"Describe {self.kind}", None, "" if obj is not None else "[b red](deleted — last known)[/]")
        target = self._last
        if target is None:
            body = Text(f"{self.kind} {self.name_} not found", style="red")
        else:
            body = getattr(self, f"describe_{self.kind}")(target)
        self.query_one("#describe", Static).update(body)

    def find(self) -> Any:
        state = self.state
        if self.kind == "instance":
            return state.instance_by_name(self.name_)
        if self.kind == "model":
            return state.model_by_name(self.name_)
        return state.worker_by_name(self.name_)

    @staticmethod
    def _grid() -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        return grid

    def _events(self, names: set[str]) -> Table:
        table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
        for column in ("AGE", "OBJECT", "REASON", "MESSAGE"):
            table.add_column(column, no_wrap=column != "MESSAGE")
        for event in self.state.events_about(names, limit=12):
            table.add_row(fmt.age(event.created_at, self.now), event.object_name, event.reason, event.message)
        return table

    def describe_instance(self, inst: schemas.InstanceOut) -> Any:
        from rich.console import Group

        grid = self._grid()
        grid.add_row("Name", inst.name)
        grid.add_row("Model", f"{inst.model_name}  (generation {inst.generation})")
        grid.add_row("State", fmt.instance_state_text(inst))
        if inst.state_message:
            grid.add_row("Message", Text(inst.state_message.strip()[-600:], style="red" if inst.state == "error" else ""))
        grid.add_row("Worker", inst.worker_name or "-  (not scheduled)")
        grid.add_row("Endpoint", f"{inst.address}:{inst.port}" if inst.port else "-")
        grid.add_row("PID", str(inst.pid) if inst.pid else "-")
        claim = inst.claim
        if claim is None:
            grid.add_row("Claim", "-")
        elif claim.device == "gpu":
            grid.add_row("Claim", f"GPU {', '.join(map(str, claim.gpu_indexes))}: "
                                  f"{fmt.gb(claim.vram_bytes_per_gpu, 2)} GB VRAM each, {fmt.human_bytes(claim.ram_bytes)} RAM")
        else:
            grid.add_row("Claim", f"CPU: {fmt.human_bytes(claim.ram_bytes)} RAM")
        grid.add_row("Restarts", str(inst.restart_count))
        grid.add_row("Backend", f"{inst.spec.backend} · ctx {inst.spec.context_length}"
                                f"{' · cpu only' if inst.spec.cpu_only else ''}")
        grid.add_row("Source", inst.spec.source)
        if inst.spec.args:
            grid.add_row("Args", " ".join(inst.spec.args))
        grid.add_row("Age", f"{fmt.age(inst.created_at, self.now)} (updated {fmt.age(inst.updated_at, self.now)} ago)")
        parts: list[Any] = [grid]
        if inst.schedule_reasons:
            reasons = Table(title="Why not scheduled", title_justify="left", title_style="bold yellow", box=None,
                            padding=(0, 1), header_style="bold")
            for column in ("WORKER", "REASON", "MESSAGE"):
                reasons.add_column(column, no_wrap=column != "MESSAGE")
            for r in inst.schedule_reasons:
                reasons.add_row(r.worker or "(all)", r.reason, r.message)
            parts += [Text(""), reasons]
        parts += [Text(""), Text("Events", style="bold"), self._events({inst.name})]
        return Group(*parts)

    def describe_model(self, model: schemas.ModelOut) -> Any:
        from rich.console import Group

        ready = self.state.ready_counts()[model.id]
        grid = self._grid()
        grid.add_row("Name", model.name)
        grid.add_row("State", fmt.state_text(model.state))
        grid.add_row("Replicas", Text(f"{ready}/{model.replicas} ready", style="green" if ready >= model.replicas else "yellow"))
        grid.add_row("Generation", f"{model.generation}  (max surge {model.max_surge}, max unavailable "
                                   f"{model.max_unavailable})")
        rollout = self.state.rollouts().get(model.id)
        if rollout is not None:
            grid.add_row("Rollout", rollout_text(rollout))
        grid.add_row("Backend", f"{model.spec.backend}{' ' + model.spec.backend_version if model.spec.backend_version else ''}")
        grid.add_row("Source", model.spec.source)
        grid.add_row("Context", str(model.spec.context_length))
        grid.add_row("CPU only", "yes" if model.spec.cpu_only else "no")
        if model.spec.args:
            grid.add_row("Args", " ".join(model.spec.args))
        grid.add_row("Age", fmt.age(model.created_at, self.now))
        instances = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
        for column in ("INSTANCE", "STATE", "WORKER", "PLACEMENT", "PORT", "RST"):
            instances.add_column(column, no_wrap=True)
        names = {model.name}
        for inst in self.state.instances_of(model.id):
            names.add(inst.name)
            instances.add_row(inst.name, fmt.instance_state_text(inst), inst.worker_name or "-", placement(inst),
                              str(inst.port or "-"), str(inst.restart_count))
        return Group(grid, Text(""), Text("Instances", style="bold"), instances, Text(""),
                     Text("Events", style="bold"), self._events(names))

    def describe_worker(self, worker: schemas.WorkerOut) -> Any:
        from rich.console import Group

        grid = self._grid()
        grid.add_row("Name", worker.name)
        state = fmt.state_text(worker.state)
        if worker.state_message:
            state.append(f"  {worker.state_message}", style="dim")
        grid.add_row("State", state)
        grid.add_row("Cordoned", "yes, draining: its instances move away" if worker.draining else
                     "yes: no new instances" if worker.cordoned else "no")
        grid.add_row("Address", f"{worker.address} (agent port {worker.agent_port})")
        grid.add_row("Heartbeat", f"{fmt.age(worker.last_heartbeat_at, self.now)} ago")
        host = worker.host
        grid.add_row("Host", f"{host.hostname or '-'} · {host.os or '-'} · {host.cpu_count} CPUs")
        grid.add_row("CPU", Text.assemble(fmt.bar(host.cpu_percent, 20), f" {host.cpu_percent:.0f}%"))
        ram = 100.0 * host.memory_used / host.memory_total if host.memory_total else 0.0
        grid.add_row("RAM", Text.assemble(fmt.bar(ram, 20), f" {fmt.gb(host.memory_used, 1)}/{fmt.gb(host.memory_total)} GB"))
        if worker.labels:
            grid.add_row("Labels", ", ".join(f"{k}={v}" for k, v in sorted(worker.labels.items())))
        detail = gpu_detail(self.state, worker, self.size.width or 80)
        instances = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
        for column in ("INSTANCE", "STATE", "PLACEMENT", "PORT"):
            instances.add_column(column, no_wrap=True)
        for inst in self.state.instances_on(worker.id):
            instances.add_row(inst.name, fmt.instance_state_text(inst), placement(inst), str(inst.port or "-"))
        nvml = gpu_nvml_table(worker)
        extra = [Text(""), Text("GPU power, MIG and processes (NVML)", style="bold"), nvml] if nvml is not None else []
        return Group(grid, Text(""), Text("GPUs", style="bold"), detail, *extra, Text(""),
                     Text("Instances", style="bold"), instances, Text(""), Text("Events", style="bold"),
                     self._events({worker.name}))

    def action_back(self) -> None:
        prompt = self.query_one(PromptBar)
        if prompt.is_open:
            self.close_prompt()
            return
        self.app.pop_screen()

    def action_logs(self) -> None:
        if self.kind == "instance":
            self.app.show_logs(self.name_)

    def action_scale(self) -> None:
        if self.kind == "model" and (model := self.state.model_by_name(self.name_)) is not None:
            self.app.scale(model.name, model.replicas)

    def action_edit(self) -> None:
        if self.kind == "model":
            self.app.edit_model(self.name_)

    def action_restart(self) -> None:
        if self.kind == "instance":
            self.app.restart_instance(self.name_)
        elif self.kind == "model":
            self.app.rollout_restart(self.name_)

    def action_delete(self) -> None:
        if self.kind == "instance":
            self.app.delete_instance(self.name_)
        elif self.kind == "model":
            self.app.delete_model(self.name_)
        elif self.kind == "worker":
            self.app.remove_worker(self.name_)


# --- logs -------------------------------------------------------------------------------------

TAILS = [200, 1000, 10_000, -1]


class LogsScreen(MaasScreen):
    """An instance's log: follows by default, survives the instance (re)starting, searchable."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("f", "follow", "Follow"),
        Binding("w", "wrap", "Wrap"),
        Binding("T", "timestamps", "Time"),
        Binding("t", "tail", "Tail"),
        Binding("p", "previous", "Prev run"),
        Binding("n", "next_match(True)", "Next", show=False),
        Binding("N", "next_match(False)", "Prev match", show=False),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, instance: str, tail: int = 1000) -> None:
        super().__init__()
        self.instance = instance
        self.tail = tail
        self.previous = False
        self.stream_state = "connecting"
        self.match_count = 0

    def header_label(self) -> str:
        return f"logs {self.instance}"

    def compose_body(self) -> ComposeResult:
        yield LogView(id="log")

    def main_widget(self) -> Any:
        return self.query_one(LogView)

    @property
    def log_view(self) -> LogView:
        return self.query_one(LogView)

    def on_mount(self) -> None:  # MaasScreen.on_mount runs too
        self.start_stream()

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        view = self.log_view
        inst = self.state.instance_by_name(self.instance)
        state = inst.state if inst else "deleted"
        parts = [f"[{fmt.STATE_STYLES.get(state, 'dim')}]{state}[/]",
                 f"follow:{'[b green]on[/]' if view.follow else 'off'} tail:{'all' if self.tail < 0 else self.tail} "
                 f"wrap:{'on' if view.wrap else 'off'}{' time:on' if view.timestamps else ''}",
                 f"{view.line_count:,} lines"]
        if self.previous:
            parts.append("[yellow]previous run[/]")
        if view.search:
            parts.append(f"[b]/{view.search}[/b] ({self.match_count})")
        if self.stream_state not in ("streaming",):
            parts.append(f"[dim]{self.stream_state}[/]")
        self.set_title("Logs", None, " │ ".join(parts))

    # streaming
    def start_stream(self) -> None:
        self.run_worker(self._stream, group="logs", exclusive=True)

    async def _stream(self) -> None:
        view = self.log_view
        replace = True
        while True:
            pending = b""
            try:
                self.stream_state = "connecting"
                async for chunk in self.app.client.stream_logs(self.instance, tail=self.tail, follow=not self.previous,
                                                               previous=self.previous):
                    data = pending + chunk
                    lines = data.split(b"\n")
                    pending = lines.pop()
                    decoded = [line.decode("utf-8", "replace") for line in lines]
                    if replace:
                        view.replace(decoded)  # the tail: lines from before we looked, time unknown
                        replace = False
                    elif decoded:
                        view.append(decoded, self._now_stamp())
                    if self.stream_state != "streaming":
                        self.stream_state = "streaming"
                    self._after_lines()
                if pending:
                    view.append([pending.decode("utf-8", "replace")], self._now_stamp())
                self.stream_state = "stream ended"
            except ApiClientError as exc:
                self.stream_state = f"no log yet: {exc.message}" if exc.status == 409 else f"error: {exc.message}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.stream_state = f"error: {exc or type(exc).__name__}"
            self._after_lines()
            inst = self.state.instance_by_name(self.instance)
            if self.previous or inst is None:
                if inst is None:
                    self.stream_state = "instance deleted"
                    self._after_lines()
                return
            # The instance may be starting, restarting or briefly unreachable: fetch again, replacing
            # the view in one go so nothing flickers.
            await asyncio.sleep(1.0 if inst.state in ("pending", "scheduled", "downloading", "starting", "running") else 3.0)
            replace = True

    def _now_stamp(self) -> str:
        return self.app.clock().astimezone().strftime("%H:%M:%S")

    def _after_lines(self) -> None:
        view = self.log_view
        if view.search:
            self.match_count = len(view.matches())
        self.refresh_body(None)

    # actions
    def action_back(self) -> None:
        prompt = self.query_one(PromptBar)
        if prompt.is_open:
            if prompt.mode == "search":
                self.search_changed("")
            self.close_prompt()
            return
        if self.log_view.search:
            self.search_changed("")
            return
        self.app.pop_screen()

    def action_filter(self) -> None:
        self.query_one(PromptBar).open("search", self.log_view.search)
        self.query_one(PromptBar).placeholder = "search: text to highlight; enter jumps, n/N next/previous"

    def search_changed(self, value: str) -> None:
        view = self.log_view
        view.set_search(value)
        self.match_count = len(view.matches()) if value else 0
        self.refresh_body(None)

    def search_submitted(self, value: str) -> None:
        self.search_changed(value)
        if value and self.log_view.find(True) is None:
            self.app.notify(f"no line matches {value!r}", severity="warning")

    def action_next_match(self, forward: bool) -> None:
        if self.log_view.search:
            self.log_view.find(forward)

    def action_follow(self) -> None:
        view = self.log_view
        view.set_follow(not view.follow)
        self.refresh_body(None)

    def action_wrap(self) -> None:
        view = self.log_view
        view.set_wrap(not view.wrap)
        self.refresh_body(None)

    def action_timestamps(self) -> None:
        view = self.log_view
        view.set_timestamps(not view.timestamps)
        self.refresh_body(None)

    def action_tail(self) -> None:
        index = TAILS.index(self.tail) if self.tail in TAILS else 0
        self.tail = TAILS[(index + 1) % len(TAILS)]
        self.log_view.set_follow(True)
        self.start_stream()
        self.refresh_body(None)

    def action_previous(self) -> None:
        self.previous = not self.previous
        self.start_stream()
        self.refresh_body(None)

    def action_save(self) -> None:
        lines = list(self.log_view.lines)
        stamp = self.app.clock().strftime("%Y%m%d-%H%M%S")
        path = Path.cwd() / f"{self.instance}-{stamp}.log"

        async def save() -> None:
            try:
                await asyncio.to_thread(path.write_text, "\n".join(lines) + ("\n" if lines else ""))
            except OSError as exc:
                self.app.notify(f"cannot save: {exc}", severity="error")
                return
            self.app.notify(f"saved {len(lines):,} lines to {path}")

        self.run_worker(save, group="save")

    @on(LogView.FollowChanged)
    def follow_changed(self) -> None:
        self.refresh_body(None)


VIEWS: dict[str, type[MaasScreen]] = {
    "dash": DashboardScreen,
    "workers": WorkersScreen,
    "gpus": GpusScreen,
    "models": ModelsScreen,
    "instances": InstancesScreen,
    "keys": KeysScreen,
    "events": EventsScreen,
}
