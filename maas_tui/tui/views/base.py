"""What every view shares: the header, the `:`/`/` prompt and the footer (MaasScreen), and the live,
sortable table with a wide mode (TableScreen), and the scrolling page pushed over a view (PageScreen). The app calls `refresh_view()` on the visible screen
when the state changed.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Input, Static

from maas_tui.render import format as fmt
from maas_tui.tui.state import ClusterState
from maas_tui.tui.views.registry import navigable, resolve_command
from maas_tui.tui.widgets import ClusterHeader, KeyFooter, PromptBar, ResourceTable, set_content

if TYPE_CHECKING:
    from maas_tui.tui.app import MaasApp


class MaasScreen(Screen):
    VIEW: ClassVar[str] = ""
    BINDINGS = [
        Binding("colon", "command", "Cmd", key_display=":", tooltip="go to a view (Tab completes); :q quits"),
        Binding("slash", "filter", "Filter", key_display="/",
                tooltip="filter rows (substring); /!text hides matches"),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="this help; ctrl+p: the command palette"),
        Binding("escape", "back", "Back", show=False, tooltip="back, or clear the filter"),
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
                    self.app.notify(f"unknown command {value.strip()!r}: try {', '.join(navigable())}, help, quit",
                                    severity="warning")
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



class TableScreen(MaasScreen):
    """A live table. `rows()` yields every cell, the wide-mode ones (WIDE_COLUMNS) last; `o` cycles the
    sort column (the default order, then each column), `O` reverses it, ctrl+w toggles wide mode."""

    TITLE_TEXT: ClassVar[str] = ""
    COLUMNS: ClassVar[list[tuple[str, int | None]]] = []
    WIDE_COLUMNS: ClassVar[list[tuple[str, int | None]]] = []
    KINDS: ClassVar[set[str]] = set()
    BINDINGS = [
        Binding("o", "sort", "Sort", show=False, tooltip="sort by the next column"),
        Binding("O", "sort_reverse", "Reverse", show=False, tooltip="reverse the order"),
        Binding("ctrl+w", "wide", "Wide", show=False, tooltip="wide mode (more columns; ←/→ scroll)"),
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
        # One sort toast at a time: pressing o five times shows where it ended, not five toasts. (Textual has
        # no public way to withdraw one toast; without these internals the toasts just stack.)
        withdraw = getattr(self.app, "_unnotify", None)
        for toast in list(getattr(self.app, "_notifications", ())):
            if withdraw is not None and toast.message.startswith(("sorted by", "default order")):
                withdraw(toast)
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


class DetailTableScreen(TableScreen):
    """A table with one line under it about the highlighted row (`row_detail`), kept current as the
    cursor moves and the data changes."""

    def compose_body(self) -> ComposeResult:
        yield from super().compose_body()
        yield Static(id="row-detail")

    def refresh_body(self, kinds: set[str] | None = None) -> None:
        super().refresh_body(kinds)
        self.update_row_detail()

    @on(ResourceTable.RowHighlighted)
    def update_row_detail(self) -> None:
        set_content(self.query_one("#row-detail", Static), self.row_detail(), layout=True)

    def row_detail(self) -> Text:  # pragma: no cover - overridden
        return Text()


class PageScreen(MaasScreen):
    """A scrolling page pushed over a view (a describe page, a GPU's history): `show_page` replaces its
    content; escape closes the prompt, else goes back to the view under it."""

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="describe-scroll"):
            yield Static(id="describe")

    def main_widget(self) -> Any:
        return self.query_one("#describe-scroll")

    def show_page(self, body: Any) -> None:
        self.query_one("#describe", Static).update(body)

    def action_back(self) -> None:
        prompt = self.query_one(PromptBar)
        if prompt.is_open:
            self.close_prompt()
            return
        self.app.pop_screen()
