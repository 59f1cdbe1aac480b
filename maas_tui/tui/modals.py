"""Dialogs: confirmation, a model's history, the one-time secret, and the help page (generated from the
views' registry and their key bindings). The forms are in forms.py.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from server import schemas


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no. `y` confirms; `n`, `esc` or Enter on No cancel (the default is No)."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, title: str, message: str, confirm_label: str = "Delete", variant: str = "error") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.message = message
        self.confirm_label = confirm_label
        self.variant = variant

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Static(self.title_text, classes="dialog-title")
            yield Static(self.message, classes="dialog-body")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.confirm_label} (y)", id="yes", variant=self.variant, compact=True)  # type: ignore[arg-type]
                yield Button("Cancel (n)", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HistoryScreen(ModalScreen[int | None]):
    """A model's revisions, newest first; Enter rolls back to the highlighted one (the app confirms)."""

    BINDINGS = [Binding("escape,q", "close", "Close"), Binding("enter", "pick", "Roll back to it")]

    def __init__(self, model: schemas.ModelOut, revisions: list[schemas.ModelRevisionOut], now: Any) -> None:
        super().__init__(classes="dialog-screen")
        self.model = model
        self.revisions = sorted(revisions, key=lambda r: -r.revision)
        self.now = now

    def compose(self) -> ComposeResult:
        from maas_tui.render import format as fmt
        from maas_tui.tui.widgets import ResourceTable

        with Vertical(classes="dialog history"):
            yield Static(f"History of {self.model.name}", classes="dialog-title")
            yield ResourceTable([("REV", None), ("AGE", None), ("CHANGE", 22), ("SPEC", None)], id="history")
            yield Static("enter rolls back to the highlighted revision (a new generation) · esc closes",
                         classes="hint")
        self._rows = []
        for r in self.revisions:
            rev = Text(f"{r.revision}{' *' if r.revision == self.model.generation else ''}",
                       style="bold" if r.revision == self.model.generation else "")
            spec = f"{fmt.middle_truncate(r.spec.source, 24)} ctx {r.spec.context_length}"
            if r.spec.args:
                spec += " " + " ".join(r.spec.args)
            self._rows.append((str(r.revision), (rev, fmt.age(r.created_at, self.now), r.change or "-", spec)))

    def on_mount(self) -> None:
        from maas_tui.tui.widgets import ResourceTable

        table = self.query_one(ResourceTable)
        table.sync(self._rows)
        table.focus()

    def on_resource_table_row_selected(self, event: Any) -> None:
        event.stop()
        self.dismiss(int(event.key))

    def action_pick(self) -> None:
        from maas_tui.tui.widgets import ResourceTable

        key = self.query_one(ResourceTable).selected_key
        if key is not None:
            self.dismiss(int(key))

    def action_close(self) -> None:
        self.dismiss(None)


class SecretScreen(ModalScreen[None]):
    """The new key's secret, shown once."""

    BINDINGS = [Binding("escape,enter", "close", "Close"), Binding("c", "copy", "Copy")]

    def __init__(self, created: schemas.ApiKeyCreated) -> None:
        super().__init__(classes="dialog-screen")
        self.created = created

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog secret"):
            yield Static(f"API key {self.created.name} created", classes="dialog-title")
            yield Static("Copy the secret now: it is shown only this once (only its hash is stored).",
                         classes="dialog-body")
            yield Static(self.created.key, id="secret", classes="secret-value")
            yield Static("c copies it to the clipboard (OSC 52) · enter/esc closes", classes="hint")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.created.key)
        self.app.notify("secret copied to the clipboard")

    def action_close(self) -> None:
        self.dismiss(None)



def help_page() -> Table:
    """Every key of every view, read from the bindings where they are declared (their tooltip, else
    their description), view by view in the registry's order; legends from the registry's notes."""
    from maas_tui.tui.views import REGISTRY, MaasScreen, TableScreen
    from maas_tui.tui.views.registry import binding_hints, navigable
    from maas_tui.tui.widgets import CURSOR_BINDINGS

    page = Table.grid(padding=(0, 1))
    page.add_column(style="bold", no_wrap=True)
    page.add_column()

    def add(title: str, hints: list[tuple[str, str]], notes: tuple[str, ...] = ()) -> None:
        text = Text()
        for number, (key, what) in enumerate(hints):
            if number:
                text.append(" · ", style="dim")
            text.append(key, style="bold")
            text.append(f" {what}")
        for note in notes:
            text.append(("\n" if text else "") + note, style="dim")
        page.add_row(title, text)

    add("Everywhere", binding_hints(MaasScreen.BINDINGS),
        (f"views: {' '.join(navigable())}",))
    add("Tables", binding_hints(CURSOR_BINDINGS) + binding_hints(TableScreen.BINDINGS))
    for spec in REGISTRY.values():
        if spec.key_hints or spec.notes:
            add(spec.title, spec.key_hints, spec.notes)
    return page


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self) -> None:
        super().__init__(classes="dialog-screen")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static("Help", classes="dialog-title")
            with VerticalScroll():
                yield Static(help_page())
            yield Static("↑/↓ scroll · esc closes", classes="hint")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()

    def action_close(self) -> None:
        self.dismiss(None)
