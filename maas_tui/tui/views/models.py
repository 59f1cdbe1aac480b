"""Models: ready/desired replicas and rollouts; deploy, scale, edit, roll out, roll back, delete."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.binding import Binding

from maas_tui.render import models as render
from maas_tui.tui.views.base import DetailTableScreen
from maas_tui.tui.views.registry import view
from server import schemas
from server.schemas.rollout import rollout_in_progress


@view("models", "Models", aliases=("model", "mo", "deploy", "deployments", "dp"),
      notes=("rollout bar: █ ready ▒ starting ░ not yet · ‖ paused ⚠ stalled",))
class ModelsScreen(DetailTableScreen):
    TITLE_TEXT = "Models"
    KINDS = {"models", "instances"}
    COLUMNS = render.COLUMNS
    WIDE_COLUMNS = render.WIDE_COLUMNS
    BINDINGS = [
        Binding("n", "deploy", "Deploy", tooltip="deploy a model (in the form ctrl+r previews placement)"),
        Binding("s", "scale", "Scale", tooltip="scale"),
        Binding("e", "edit", "Edit", tooltip="edit the spec (a rollout)"),
        Binding("r", "restart", "Restart", tooltip="restart the rollout (asks first)"),
        Binding("u", "undo", "Undo", tooltip="undo the rollout (asks first)"),
        Binding("p", "pause", "Pause", tooltip="pause/resume the rollout"),
        Binding("h", "history", "History", tooltip="revisions (enter there rolls back to one)"),
        Binding("plus", "nudge(1)", "+1", show=False, tooltip="one replica more"),
        Binding("minus", "nudge(-1)", "-1", show=False, tooltip="one replica less"),
        Binding("i", "instances", "Instances", tooltip="its instances"),
        Binding("ctrl+d", "delete", "Delete", tooltip="delete (asks first)"),
    ]

    def rows(self) -> Iterable[tuple[str, tuple[Any, ...]]]:
        return render.rows(self.state, self.now)

    def row_detail(self) -> Text:
        """The highlighted model's rollout in words: new vs old generation, paused, why it stalled."""
        model = self._model()
        rollout = self.state.rollouts().get(model.id) if model else None
        text = Text()
        if model is not None and model.max_replicas is not None and not (rollout and rollout_in_progress(rollout)):
            text.append(f" {model.name} ", style="bold")  # autoscaled: desired, running, the last decision
            text.append_text(render.scaling_brief(model, self.now, self.state.ready_counts()[model.id]))
        elif model is not None and rollout is not None:
            text.append(f" {model.name} ", style="bold")
            text.append_text(render.rollout_text(rollout))
        return text

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
