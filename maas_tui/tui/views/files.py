"""Model files: which source is in which worker's cache (pulling with progress, ready, error); retry a
failed pull, remove a copy. Fed by the watch (kind `files`)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.binding import Binding

from maas_tui.render import files as render
from maas_tui.tui.views.base import DetailTableScreen
from maas_tui.tui.views.registry import view


@view("files", "Files", aliases=("file", "cache"))
class FilesScreen(DetailTableScreen):
    TITLE_TEXT = "Model files"
    KINDS = {"files"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [Binding("r", "retry", "Pull again", tooltip="pull the highlighted source again (retries an error)"),
                Binding("ctrl+d", "remove", "Remove", tooltip="remove the copy from the worker's cache (asks first)")]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state.files.values(), self.now)

    def title_extra(self) -> str:
        return "maas file pull SOURCE --workers ... pre-fetches"

    def _selected(self) -> Any:
        key = self.table.selected_key
        return self.state.files.get(int(key)) if key and key.isdigit() else None

    def row_detail(self) -> Text:
        row = self._selected()
        return Text(render.line(row), style="red" if row.state == "error" else "") if row is not None else Text()

    def describe(self, key: str) -> None:
        self.app.describe("file", key)

    def action_retry(self) -> None:
        if (row := self._selected()) is not None:
            self.app.call_api(lambda: self.app.client.pull_files(row.source, [row.worker_name]),
                              f"pull of {row.source} on {row.worker_name} asked")

    def action_remove(self) -> None:
        if (row := self._selected()) is not None:
            self.app._confirm(f"Remove {row.source} from {row.worker_name}?",
                              "The worker deletes its copy; a deploy there downloads it again. "
                              "Refused while an instance there uses it.",
                              lambda: self.app.client.remove_file(row.id), f"removing {row.source} from {row.worker_name}",
                              label="Remove")
