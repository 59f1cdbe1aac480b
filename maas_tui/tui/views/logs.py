"""Logs: an instance's log, following by default, surviving the instance (re)starting, searchable."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding

from maas_tui.client import ApiClientError
from maas_tui.render import format as fmt
from maas_tui.tui.logs import LogView
from maas_tui.tui.views.base import MaasScreen
from maas_tui.tui.views.registry import view
from maas_tui.tui.widgets import PromptBar

TAILS = [200, 1000, 10_000, -1]


@view("logs", "Logs", navigable=False)
class LogsScreen(MaasScreen):
    """An instance's log: follows by default, survives the instance (re)starting, searchable."""

    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="back (or clear the search)"),
        Binding("f", "follow", "Follow", tooltip="follow new lines"),
        Binding("w", "wrap", "Wrap", tooltip="wrap long lines"),
        Binding("T", "timestamps", "Time", tooltip="the time each line arrived"),
        Binding("t", "tail", "Tail", tooltip="tail size: 200, 1000, 10000, all"),
        Binding("p", "previous", "Prev run", tooltip="the previous run's log"),
        Binding("n", "next_match(True)", "Next", show=False, tooltip="next match of the search (/)"),
        Binding("N", "next_match(False)", "Prev match", show=False, tooltip="previous match"),
        Binding("ctrl+s", "save", "Save", tooltip="save to a file (not over SSH: it would land on the server)"),
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
            parts.append(f"[b]/{escape(view.search)}[/b] ({self.match_count})")
        if self.stream_state not in ("streaming",):
            parts.append(f"[dim]{escape(self.stream_state)}[/]")  # may hold the server's message
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

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Over SSH the TUI runs on the server: a saved file would land on the server's disk.
        if action == "save" and self.app.remote:
            return False
        return True

    def action_save(self) -> None:
        if self.app.remote:
            return
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
