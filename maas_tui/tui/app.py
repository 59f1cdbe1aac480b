"""The Textual app: live cluster state from the watch stream, k9s-style navigation, operator actions.

`run_tui(server_url, token)` is what `maas tui` calls. The app takes any client with
`MaasClient`'s methods (the demo and the screenshots use `demo.DemoClient`).
"""

from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable

import aiohttp
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.command import Hit, Hits, Provider

from maas_tui.client import ApiClientError, MaasClient
from maas_tui.render import audit as audit_render
from maas_tui.tui.forms import DeployForm, EditForm, KeyCreateForm, ScaleForm
from maas_tui.tui.modals import ConfirmScreen, HelpScreen, HistoryScreen, SecretScreen
from maas_tui.tui.views import VIEWS, DescribeScreen, LogsScreen, MaasScreen
from maas_tui.tui.state import POLLED_KINDS, WATCH_KINDS, ClusterState
from server import schemas

AUDIT_SHOWN = 500  # the newest audit entries the Audit view reads (the server gives at most 1000)


class MaasCommands(Provider):
    """The command palette (ctrl+p): every view and the main actions."""

    def _commands(self) -> list[tuple[str, Callable[[], Any], str]]:
        app: MaasApp = self.app  # type: ignore[assignment]
        commands = [(f"Go to {name}", partial(app.navigate, name), f":{name}") for name in VIEWS]
        commands += [
            ("Deploy a model", app.deploy, "the deploy form"),
            ("Sort the table by the next column", partial(app.screen_action, "sort"), "o; O reverses"),
            ("Toggle wide mode", partial(app.screen_action, "wide"), "ctrl+w: more columns"),
            ("Create an API key", app.create_key, "the secret is shown once"),
            ("Help", partial(app.navigate, "help"), "keys and commands"),
        ]
        return commands

    async def discover(self) -> Hits:
        for title, callback, help_text in self._commands():
            yield Hit(1.0, title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)


class MaasApp(App[None]):
    CSS_PATH = Path(__file__).with_name("maas.tcss")  # absolute: subclasses live elsewhere
    TITLE = "MaaS-Base"
    COMMANDS = App.COMMANDS | {MaasCommands}
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    def __init__(self, client: Any, *, state: ClusterState | None = None, clock: Callable[[], datetime] | None = None,
                 watch: bool = True, start: str = "dash", refresh_delay: float = 0.05, tick: float = 2.0,
                 freeze_gc: bool = False, remote: bool = False, toast_seconds: float | None = None) -> None:
        super().__init__()
        # Every notification's lifetime when set (the screenshots keep theirs until the shot, however slow
        # the machine); otherwise each call's own.
        self.toast_seconds = toast_seconds
        # Over SSH (the front door sets MAAS_TUI_REMOTE) the app runs on the server: nothing may write
        # files there for the client (log save, Textual's screenshot).
        self.remote = remote
        self.client = client
        self.server: str = getattr(client, "server", "")
        self.state = state or ClusterState()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.watch_enabled = watch
        self.start_view = start
        self.refresh_delay = refresh_delay
        self.tick = tick
        self.history: list[str] = []
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self.refreshes = 0  # how many times the visible screen was refreshed (tests, bench)
        self.freeze_gc = freeze_gc
        self._frozen = False

    def notify(self, message: str, *, markup: bool = False, **kwargs: Any) -> None:
        """Notifications show text as it is: messages often quote the server, which must not inject markup."""
        if self.toast_seconds is not None:
            kwargs["timeout"] = self.toast_seconds
        super().notify(message, markup=markup, **kwargs)

    def get_system_commands(self, screen: Any) -> Any:
        for command in super().get_system_commands(screen):
            if not (self.remote and command.title == "Screenshot"):
                yield command

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        if self.remote:
            self.notify("screenshots are off over SSH (they would be written on the server)", severity="warning")
            return
        super().action_screenshot(filename, path)

    def deliver_screenshot(self, *args: Any, **kwargs: Any) -> Any:
        if self.remote:
            return None
        return super().deliver_screenshot(*args, **kwargs)

    # --- lifecycle ------------------------------------------------------------------------

    def on_mount(self) -> None:
        for name, view in VIEWS.items():
            self.install_screen(view(), name)
        self.push_screen(self.start_view)
        if self.watch_enabled:
            self.watch_cluster()
        if self.tick:
            self.set_interval(self.tick, self._on_tick)

    async def on_unmount(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()

    def _on_tick(self) -> None:
        # Ages ("5s ago") move on even when nothing else does.
        self.mark_dirty({"clock"})

    # --- the watch stream -----------------------------------------------------------------

    @work(exclusive=True, group="watch")
    async def watch_cluster(self) -> None:
        """Follow the watch stream for ever: resume with the last version seen, back off up to 2 s.

        After a failure the server's /healthz is probed first, so the header says "live" as soon
        as the server answers again (a resumed stream may stay quiet until the next event).
        """
        delay = 0.25
        auth_failed = False
        while True:
            try:
                if self.state.error and not auth_failed:
                    await self.client.health()
                    self.state.set_connected()
                    self.mark_dirty({"connection"})
                async for message in self.client.watch(WATCH_KINDS, since=self.state.version):
                    if not self.state.connected:
                        self.state.set_connected()
                        self.mark_dirty({"connection"})
                    delay = 0.25
                    auth_failed = False
                    changed = self.state.apply(message)
                    if changed:
                        self.mark_dirty(changed)
                    if message.type == "snapshot" and self.freeze_gc and not self._frozen:
                        self.settle_memory()
                reason = "the server ended the stream"
            except asyncio.CancelledError:
                raise
            except ApiClientError as exc:
                reason = exc.message
                if exc.status in (401, 403):
                    reason = f"{exc.message}: log in again with `maas login`"
                    if not auth_failed:
                        self.notify(reason, title="the server refused the watch", severity="error", timeout=15)
                    delay = 5.0
                auth_failed = exc.status in (401, 403)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                reason = str(exc) or type(exc).__name__
            self.state.set_disconnected(reason, auth_failed)
            self.mark_dirty({"connection"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def settle_memory(self) -> None:
        """Move everything alive after startup out of the garbage collector's way.

        Full collections over Textual's and the state's long-lived objects cost 50-70 ms on a large
        cluster (a visible hitch every few seconds); frozen, they are never scanned again.
        """
        gc.collect()
        gc.freeze()
        self._frozen = True

    def apply_message(self, message: schemas.WatchMessage) -> None:
        """Apply one watch message as the stream would (the bench and tests feed messages directly)."""
        changed = self.state.apply(message)
        if changed:
            self.mark_dirty(changed)

    def mark_dirty(self, kinds: set[str]) -> None:
        self._dirty |= kinds
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.refresh_delay > 0:
                self.set_timer(self.refresh_delay, self.flush)
            else:
                self.call_later(self.flush)

    def flush(self) -> None:
        """Refresh what is visible: the top screen, and the view under a dialog."""
        self._flush_scheduled = False
        kinds, self._dirty = self._dirty, set()
        if not kinds:
            return
        if "clock" in kinds or "connection" in kinds:
            kinds = set(WATCH_KINDS) | POLLED_KINDS
        self.refreshes += 1
        with self.batch_update():
            for screen in reversed(self.screen_stack):
                if isinstance(screen, MaasScreen):
                    screen.refresh_view(kinds)
                    break

    # --- navigation -----------------------------------------------------------------------

    @property
    def current_view(self) -> str | None:
        for screen in reversed(self.screen_stack):
            for name, installed in self._installed_screens.items():
                if installed is screen:
                    return name
        return None

    def navigate(self, name: str, filter_text: str | None = None) -> None:
        if name == "quit":
            self.exit()
            return
        if name == "help":
            self.push_screen(HelpScreen())
            return
        if name not in VIEWS:
            return
        current = self.current_view
        while len(self.screen_stack) > 2 and self.screen is not self._installed_screens.get(current or ""):
            self.pop_screen()
        if current != name:
            if current is not None:
                self.history.append(current)
                del self.history[:-20]
            self.switch_screen(name)
        if filter_text is not None:
            view = self._installed_screens[name]
            assert isinstance(view, MaasScreen)
            view.set_filter(filter_text)

    def screen_action(self, action: str) -> None:
        """Run a view's action from the palette (the palette itself is a screen on top)."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, MaasScreen):
                method = getattr(screen, f"action_{action}", None)
                if method is not None:
                    method()
                return

    def back(self) -> None:
        if self.history:
            self.switch_screen(self.history.pop())

    def describe(self, kind: str, name: str) -> None:
        self.push_screen(DescribeScreen(kind, name))

    def show_logs(self, instance: str) -> None:
        self.push_screen(LogsScreen(instance))

    # --- actions (each API call runs in a worker; errors become notifications) -------------

    def call_api(self, call: Callable[[], Any], success: str | None = None,
                 then: Callable[[Any], None] | None = None) -> None:
        async def run() -> None:
            try:
                result = await call()
            except ApiClientError as exc:
                self.notify(exc.message, title="the server refused", severity="error", timeout=6)
                return
            if success:
                self.notify(success)
            if then is not None:
                then(result)

        self.run_worker(run, group="api")

    def deploy(self) -> None:
        def done(model: schemas.ModelOut | None) -> None:
            if model is None:
                return
            self.notify(f"deploying {model.name}: {model.replicas} replica{'s' if model.replicas != 1 else ''}")
            self.navigate("models")
            view = self._installed_screens["models"]
            self.call_after_refresh(lambda: view.select_key(model.name))  # type: ignore[attr-defined]

        self.push_screen(DeployForm(), done)

    def scale(self, model: str, replicas: int) -> None:
        def done(result: schemas.ModelOut | None) -> None:
            if result is not None:
                self.notify(f"scaling {result.name} to {result.replicas}")

        self.push_screen(ScaleForm(model, replicas), done)

    def scale_to(self, model: str, replicas: int) -> None:
        self.call_api(lambda: self.client.update_model(model, {"replicas": replicas}), f"scaling {model} to {replicas}")

    def delete_model(self, name: str) -> None:
        model = self.state.model_by_name(name)
        count = len(self.state.instances_of(model.id)) if model else 0
        self._confirm(f"Delete model {name}?",
                      f"Its {count} instance{'s' if count != 1 else ''} will be stopped and the model removed.",
                      lambda: self.client.delete_model(name), f"deleting {name}")

    def delete_instance(self, name: str) -> None:
        self._confirm(f"Delete instance {name}?",
                      "Its process is stopped; the model controller starts a replacement.",
                      lambda: self.client.delete_instance(name), f"deleting {name}")

    def remove_worker(self, name: str) -> None:
        self._confirm(f"Remove worker {name}?", "Its instances are rescheduled elsewhere; a running agent will "
                      "register it again.", lambda: self.client.delete_worker(name), f"removed {name}")

    def revoke_key(self, name: str) -> None:
        self._confirm(f"Revoke API key {name}?", "Applications using it are refused from now on.",
                      lambda: self.client.delete_key(name), f"revoked {name}", then=lambda _: self.load_keys(),
                      label="Revoke")

    def _confirm(self, title: str, message: str, call: Callable[[], Any], success: str,
                 then: Callable[[Any], None] | None = None, label: str = "Delete", variant: str = "error") -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.call_api(call, success, then)

        self.push_screen(ConfirmScreen(title, message, label, variant), answered)

    # models: edit and rollouts
    def edit_model(self, name: str) -> None:
        model = self.state.model_by_name(name)
        if model is None:
            return

        def done(result: schemas.ModelOut | None) -> None:
            if result is None:
                return
            if result.generation != model.generation:
                self.notify(f"rolling out {result.name} generation {result.generation}")
            else:
                self.notify(f"updated {result.name}")

        self.push_screen(EditForm(model), done)

    def rollout_restart(self, name: str) -> None:
        self._confirm(f"Restart {name}?", "Every instance is replaced by a fresh one (a new generation, same spec), "
                      "within max surge / max unavailable.", lambda: self.client.rollout_action(name, "restart"),
                      f"restarting {name}", label="Restart", variant="warning")

    def rollout_undo(self, name: str, to_revision: int | None = None) -> None:
        target = f"revision {to_revision}" if to_revision is not None else "the previous spec"
        self._confirm(f"Roll {name} back to {target}?", "The older spec is rolled out as a new generation.",
                      lambda: self.client.rollout_action(name, "undo", to_revision),
                      f"rolling {name} back to {target}", label="Roll back", variant="warning")

    def rollout_pause(self, name: str, pause: bool) -> None:
        action = "pause" if pause else "resume"
        self.call_api(lambda: self.client.rollout_action(name, action),
                      f"{'paused' if pause else 'resumed'} the rollout of {name}")

    def model_history(self, name: str) -> None:
        async def run() -> None:
            model = self.state.model_by_name(name)
            try:
                revisions = await self.client.model_history(name)
            except ApiClientError as exc:
                self.notify(exc.message, title="cannot read the history", severity="error", timeout=6)
                return
            if model is None:
                return

            def picked(revision: int | None) -> None:
                if revision is not None:
                    self.rollout_undo(name, revision)

            self.push_screen(HistoryScreen(model, revisions, self.clock()), picked)

        self.run_worker(run, group="api")

    # workers and instances
    def cordon_worker(self, name: str) -> None:
        worker = self.state.worker_by_name(name)
        if worker is not None and (worker.cordoned or worker.draining):
            self.call_api(lambda: self.client.worker_action(name, "uncordon"), f"uncordoned {name}")
            return
        self._confirm(f"Cordon worker {name}?", "No new instances are placed on it; the ones there keep running.",
                      lambda: self.client.worker_action(name, "cordon"), f"cordoned {name}", label="Cordon",
                      variant="warning")

    def drain_worker(self, name: str) -> None:
        count = len(self.state.instances_on(w.id)) if (w := self.state.worker_by_name(name)) else 0
        self._confirm(f"Drain worker {name}?", f"It is cordoned and its {count} instance{'s' if count != 1 else ''} "
                      "move to other workers (replacements start before the old ones stop).",
                      lambda: self.client.worker_action(name, "drain"), f"draining {name}", label="Drain")

    def restart_instance(self, name: str) -> None:
        self._confirm(f"Restart instance {name}?", "Its workload is stopped and started again on the same worker.",
                      lambda: self.client.restart_instance(name), f"restarting {name}", label="Restart",
                      variant="warning")

    def create_key(self) -> None:
        def created(result: schemas.ApiKeyCreated | None) -> None:
            if result is None:
                return
            self.load_keys()
            self.push_screen(SecretScreen(result))

        self.push_screen(KeyCreateForm(), created)

    def load_keys(self) -> None:
        self._load_list("keys", self.client.list_keys)

    def load_teams(self) -> None:
        self._load_list("teams", self.client.list_teams)

    def load_usage(self) -> None:
        """The last 24 hours of gateway usage by hour, model and route (the Usage view)."""
        self._load_list("usage", lambda: self.client.usage("day,hour,model,route", since="24h"))
        self._load_list("limits", self.client.list_limits)  # who is close to one

    def _load_list(self, kind: str, call: Callable[[], Any]) -> None:
        """Read a kind the watch does not carry (state.POLLED_KINDS) into the state; its view shows it on arrival."""
        async def run() -> None:
            try:
                items = await call()
            except ApiClientError as exc:
                if self.state.connected:
                    self.notify(f"cannot list {kind}: {exc.message}", severity="warning")
                return
            except (aiohttp.ClientError, OSError, TimeoutError):
                return
            setattr(self.state, kind, items)
            self.state.revision[kind] += 1
            self.mark_dirty({kind})

        self.run_worker(run, group=kind, exclusive=True)

    def load_audit(self) -> None:
        """The audit log, newest first; a refusal (only admins may read it) is kept for the view to say."""
        async def run() -> None:
            try:
                entries = await self.client.audit(limit=AUDIT_SHOWN)
            except ApiClientError as exc:
                if exc.status == 403:
                    self.state.audit, self.state.audit_error = [], audit_render.ADMIN_ONLY
                else:
                    self.state.audit_error = f"cannot read the audit log: {exc.message}"
            except (aiohttp.ClientError, OSError, TimeoutError):
                return
            else:
                self.state.audit, self.state.audit_error = entries, ""
            self.state.revision["audit"] += 1
            self.mark_dirty({"audit"})

        self.run_worker(run, group="audit", exclusive=True)


def run_tui(server_url: str, token: str, remote: bool = False) -> None:
    """Run the TUI against a server until the user quits (blocking); a crash exits 1 (see run_app)."""
    run_app(MaasApp(MaasClient(server_url, token), freeze_gc=True, remote=remote))


def crash_log_path() -> Path:
    """Where a crashed TUI leaves its traceback: MAAS_TUI_LOG, else the user's state folder."""
    import os

    import platformdirs

    override = os.environ.get("MAAS_TUI_LOG")
    return Path(override) if override else Path(platformdirs.user_state_dir("maas")) / "tui.log"


def run_app(app: MaasApp, headless: bool = False) -> None:
    """Run the app; when it stops on an error, write the traceback to crash_log_path() and exit 1
    with one short line (never status 0, never a screenful of traceback over SSH)."""
    import io
    import sys
    import traceback

    from rich.console import Console

    details = io.StringIO()
    # Textual prints an unhandled error's traceback on its error console after leaving the screen.
    app.error_console = Console(file=details, width=120, markup=False, highlight=False, color_system=None)
    error: BaseException | None = None
    try:
        app.run(headless=headless)
    except Exception as exc:  # raised outside Textual's own handling (driver, terminal)
        error = exc
        details.write("".join(traceback.format_exception(exc)))
    if error is None and not app.return_code:
        return
    error = error or getattr(app, "_exception", None)
    if isinstance(getattr(error, "error", None), BaseException):  # textual's WorkerFailed: say what failed
        error = error.error
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error else "an error"
    path = crash_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log_file:
            log_file.write(f"--- maas tui stopped at {datetime.now(UTC).isoformat()}: {reason}\n{details.getvalue()}\n")
        where = f"details in {path}"
    except OSError as exc:
        where = f"no log written ({path}: {exc.strerror or exc})"
    sys.stderr.write(f"maas tui stopped on an internal error ({reason[:200]}); {where}\n")
    raise SystemExit(app.return_code or 1)
