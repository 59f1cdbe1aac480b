"""GPUs: every GPU of every worker with utilisation, memory, claims and the instances on it; enter: the
GPU's history (braille graphs of the server's last hour, GET /v2/telemetry), w: its worker."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Group
from rich.text import Text
from textual.binding import Binding

from maas_tui.client import ApiClientError
from maas_tui.render import format as fmt
from maas_tui.render import telemetry
from maas_tui.render import workers as render
from maas_tui.tui.views.base import PageScreen, TableScreen
from maas_tui.tui.views.registry import view

HISTORY_REFRESH_SECONDS = 5.0


@view("gpus", "GPUs", aliases=("gpu",))
class GpusScreen(TableScreen):
    TITLE_TEXT = "GPUs"
    KINDS = {"workers", "instances"}
    COLUMNS = render.GPU_COLUMNS
    WIDE_COLUMNS = render.GPU_WIDE_COLUMNS
    BINDINGS = [Binding("w", "worker", "Worker", tooltip="the highlighted GPU's worker")]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.gpu_rows(self.state)

    def describe(self, key: str) -> None:
        worker, _, index = key.rpartition("/")
        self.app.push_screen(GpuHistoryScreen(worker, int(index)))

    def action_worker(self) -> None:
        if (key := self.table.selected_key) is not None:
            self.app.describe("worker", key.rsplit("/", 1)[0])


@view("gpu-history", "GPU history", navigable=False)
class GpuHistoryScreen(PageScreen):
    """One GPU's last hour on this server: utilisation, memory, power and temperature as braille graphs,
    and the instances claiming it. Fetched on opening and every few seconds (the history is not on the
    watch)."""

    BINDINGS = [Binding("escape", "back", "Back", tooltip="back to the GPUs"),
                Binding("w", "worker", "Worker", tooltip="describe the GPU's worker")]

    def __init__(self, worker: str, index: int) -> None:
        super().__init__()
        self.worker_name = worker
        self.index = index
        self.history: Any = None
        self.problem = ""

    def header_label(self) -> str:
        return f"gpu {self.worker_name}/{self.index}"

    def on_mount(self) -> None:
        super().on_mount()
        self.fetch()
        self.set_interval(HISTORY_REFRESH_SECONDS, self.fetch)

    def fetch(self) -> None:
        async def run() -> None:
            try:
                result = await self.app.client.telemetry(worker=self.worker_name, since="1h")
            except ApiClientError as exc:
                self.problem = exc.message
            else:
                self.problem = ""
                self.history = next((g for g in result.gpus if g.gpu == self.index), None)
            self.refresh_body()

        self.run_worker(run, group="gpu-history", exclusive=True)

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        worker = self.state.worker_by_name(self.worker_name)
        gpu = next((g for g in worker.gpus if g.index == self.index), None) if worker else None
        self.set_title(f"GPU history {self.worker_name}/{self.index}", None,
                       "" if gpu is not None else "[b red](gone — last known)[/]")
        head = Text()
        if gpu is not None:
            head.append(f" {gpu.name.replace(' (simulated)', '')}", style="bold")
            if gpu.simulated:
                head.append(" (simulated)", style="italic yellow")
            holders = self.state.gpu_claims().get((worker.id, gpu.index), [])
            claimed = sum(i.claim.vram_bytes_per_gpu for i in holders if i.claim)
            head.append(f"  claim {fmt.gb(claimed, 1)}G by {', '.join(i.name for i in holders) or 'nobody'}",
                        style="yellow" if holders else "dim")
        if self.problem:
            body: Any = Text(self.problem, style="red")
        else:
            width = max(20, (self.size.width or 80) - 4)
            body = telemetry.gpu_graphs(self.history, gpu.memory_total if gpu else 0, width=width, height=2)
        self.show_page(Group(head, body))

    def action_worker(self) -> None:
        self.app.describe("worker", self.worker_name)
