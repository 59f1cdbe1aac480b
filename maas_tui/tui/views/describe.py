"""Describe: `maas ... describe` as a live screen (model, instance, worker, API key, team or audit entry), pushed
over a view."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text
from textual.binding import Binding

from maas_tui.client import ApiClientError
from maas_tui.render import audit, instances, keys, models, teams, telemetry, workers
from maas_tui.render import files as files_render
from maas_tui.tui.views.base import PageScreen
from maas_tui.tui.views.registry import view
from server import schemas


@view("describe", "Describe", navigable=False)
class DescribeScreen(PageScreen):
    """`maas ... describe` as a live screen: the object's fields, related objects, recent events."""

    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="back to the view"),
        Binding("l", "logs", "Logs", tooltip="an instance's log"),
        Binding("s", "scale", "Scale", tooltip="scale a model"),
        Binding("e", "edit", "Edit", tooltip="edit a model's spec"),
        Binding("r", "restart", "Restart", tooltip="restart the instance, or the model's rollout"),
        Binding("ctrl+d", "delete", "Delete", tooltip="delete (asks first)"),
    ]

    def __init__(self, kind: str, name: str) -> None:
        super().__init__()
        self.kind = kind
        self.name_ = name
        self._last: Any = None
        self.activity: Any = None  # GET /v2/telemetry for a model or an instance (not on the watch)

    def header_label(self) -> str:
        return f"{self.kind} {self.name_}"

    def on_mount(self) -> None:
        super().on_mount()
        if self.kind in ("model", "instance"):
            self.fetch_activity()
            self.set_interval(5.0, self.fetch_activity)

    def fetch_activity(self) -> None:
        async def run() -> None:
            try:
                self.activity = await self.app.client.telemetry(since="15m", **{self.kind: self.name_})
            except ApiClientError:  # the history is an extra: the page stands without it
                return
            self.refresh_body()

        self.run_worker(run, group="activity", exclusive=True)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "logs":
            return self.kind == "instance"
        if action in ("scale", "edit"):
            return self.kind == "model"
        if action == "restart":
            return self.kind in ("model", "instance")
        if action == "delete":
            return self.kind in ("instance", "model", "worker", "key")
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
        self.show_page(body)

    def find(self) -> Any:
        state = self.state
        if self.kind == "instance":
            return state.instance_by_name(self.name_)
        if self.kind == "model":
            return state.model_by_name(self.name_)
        if self.kind == "key":
            return next((k for k in state.keys if k.name == self.name_), None)
        if self.kind == "team":
            return next((t for t in state.teams if t.name == self.name_), None)
        if self.kind == "audit":
            return next((e for e in state.audit if str(e.id) == self.name_), None)
        if self.kind == "file":
            return state.files.get(int(self.name_)) if self.name_.isdigit() else None
        return state.worker_by_name(self.name_)

    def describe_key(self, key: schemas.ApiKeyOut) -> RenderableType:
        return keys.describe(key, now=self.now)

    def describe_team(self, team: schemas.TeamOut) -> RenderableType:
        return teams.describe(team, now=self.now)

    def describe_audit(self, entry: schemas.AuditEntryOut) -> RenderableType:
        return audit.describe(entry)

    def describe_file(self, row: schemas.ModelFileOut) -> RenderableType:
        return files_render.describe(row, now=self.now)

    def describe_instance(self, inst: schemas.InstanceOut) -> RenderableType:
        activity = self.activity.instances[0] if self.activity is not None and self.activity.instances else None
        return instances.describe(inst, events=self.state.events_about({inst.name}, limit=12), now=self.now,
                                  activity=activity)

    def describe_model(self, model: schemas.ModelOut) -> RenderableType:
        owned = self.state.instances_of(model.id)
        names = {model.name} | {i.name for i in owned}
        page = models.describe(model, instances=owned, events=self.state.events_about(names, limit=12),
                               rollout=self.state.rollouts().get(model.id), now=self.now,
                               ready=self.state.ready_counts()[model.id])
        return Group(telemetry.model_activity(self.activity), Text(""), page)

    def describe_worker(self, worker: schemas.WorkerOut) -> RenderableType:
        return workers.describe(worker, state=self.state, events=self.state.events_about({worker.name}, limit=12),
                                now=self.now, width=self.size.width or 80)

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
        elif self.kind == "key":
            self.app.revoke_key(self.name_)
