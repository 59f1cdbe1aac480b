"""GPUs: every GPU of every worker with utilisation, memory, claims and the instances on it."""

from __future__ import annotations

from typing import Any, Iterable

from maas_tui.render import workers as render
from maas_tui.tui.views.base import TableScreen
from maas_tui.tui.views.registry import view


@view("gpus", "GPUs", aliases=("gpu",))
class GpusScreen(TableScreen):
    TITLE_TEXT = "GPUs"
    KINDS = {"workers", "instances"}
    COLUMNS = render.GPU_COLUMNS
    WIDE_COLUMNS = render.GPU_WIDE_COLUMNS

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.gpu_rows(self.state)

    def describe(self, key: str) -> None:
        self.app.describe("worker", key.rsplit("/", 1)[0])
