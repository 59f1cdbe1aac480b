"""The dashboard: a GPU heatmap (one row per worker), the selected worker's GPUs with history."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from maas_tui.render import format as fmt
from maas_tui.render.workers import gpu_detail
from maas_tui.tui.views.base import MaasScreen
from maas_tui.tui.views.registry import view
from maas_tui.tui.heatmap import METRICS, GpuHeatmap
from maas_tui.tui.widgets import set_content


@view("dash", "Dashboard", aliases=("dashboard", "d", "heatmap", "home"))
class DashboardScreen(MaasScreen):
    BINDINGS = [Binding("m", "metric", "Metric", tooltip="cycle the heatmap metric: utilisation, memory used, memory claimed")]

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
