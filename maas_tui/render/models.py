"""Models: the table columns, the rollout column and sentence, the describe page, the kubectl document."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Group, RenderableType
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.claims import claim_cell
from maas_tui.render.common import Column, Row, document, events_table, grid, section, small_table
from maas_tui.render.format import iec_bytes
from server import schemas
from server.schemas.rollout import rollout_in_progress

if TYPE_CHECKING:
    from maas_tui.tui.state import ClusterState

KIND = "Model"
COLUMNS: list[Column] = [("NAME", None), ("READY", None), ("STATE", None), ("GEN", None), ("ROLLOUT", None),
                         ("SOURCE", 20), ("AGE", None)]
WIDE_COLUMNS: list[Column] = [("BACKEND", None), ("CTX", None), ("SURGE/UNAV", None), ("SCALING", None),
                               ("PRIORITY", None), ("ARGS", 40)]


def ready_text(ready: int, replicas: int) -> Text:
    return Text(f"{ready}/{replicas}", style="green" if ready >= replicas else ("yellow" if ready else "red"))


def rows(state: "ClusterState", now: datetime) -> Iterable[Row]:
    ready = state.ready_counts()
    rollouts = state.rollouts()
    for m in state.sorted_models():
        yield m.name, (m.name, ready_text(ready[m.id], m.replicas), fmt.state_text(m.state), str(m.generation),
                       rollout_cell(rollouts.get(m.id)), fmt.middle_truncate(m.spec.source, 20),
                       fmt.age(m.created_at, now), m.spec.backend, str(m.spec.context_length),
                       f"{m.max_surge}/{m.max_unavailable}", scaling_cell(m), m.priority,
                       " ".join(m.spec.args) or "-")


def scaling_cell(model: schemas.ModelOut) -> Text:
    """The SCALING column: `manual`, or `auto 0-4 @8` (min-max replicas, target in flight per replica)."""
    if model.max_replicas is None:
        return Text("manual", style="dim")
    return Text(f"auto {model.min_replicas}-{model.max_replicas} @{model.target_concurrency}")


def scaling_text(model: schemas.ModelOut, now: datetime, ready: int | None = None) -> Text:
    """Autoscaling in words: the range and timings, desired vs current, and the last decision with its reason."""
    text = Text()
    if model.max_replicas is None:
        text.append("manual (maas model autoscale NAME --max N turns autoscaling on)", style="dim")
        return text
    ready = model.ready_replicas if ready is None else ready
    text.append(f"{model.min_replicas}-{model.max_replicas} replicas, {model.target_concurrency} in flight per replica; "
                f"desired {model.replicas}, running {ready}")
    text.append(f" · down after {fmt_seconds(model.scale_down_delay)}", style="dim")
    if model.min_replicas == 0:
        text.append(f", to zero after {fmt_seconds(model.idle_timeout)} idle", style="dim")
    text.append(f", requests held up to {fmt_seconds(model.cold_start_timeout)} while a replica starts", style="dim")
    if model.scale_reason:
        when = f" ({fmt.age(model.scaled_at, now)} ago)" if model.scaled_at else ""
        text.append(f"\nlast: {model.scale_reason}{when}")
    return text


def scaling_brief(model: schemas.ModelOut, now: datetime, ready: int) -> Text:
    """The TUI's detail line for an autoscaled model: the range, desired vs running, then the last decision."""
    text = Text(f"autoscaling {model.min_replicas}-{model.max_replicas} @{model.target_concurrency} in flight · "
                f"desired {model.replicas}, running {ready}")
    if model.scale_reason:
        when = f" {fmt.age(model.scaled_at, now)} ago" if model.scaled_at else ""
        text.append(f"\n last{when}: {model.scale_reason}", style="dim")
    return text


def fmt_seconds(seconds: float) -> str:
    """90 -> `90 s`, 900 -> `15 min`, 7200 -> `2 h`."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def rollout_cell(rollout: schemas.RolloutStatus | None) -> Text:
    """The ROLLOUT column: a bar of the new generation's progress with the old count, `-` when none runs."""
    if rollout is None or not rollout_in_progress(rollout):
        return Text("-", style="dim")
    cell = Text()
    if rollout.paused:
        cell.append("‖ ", style="bold yellow")
    elif rollout.message:
        cell.append("⚠ ", style="bold red")
    cell.append_text(fmt.rollout_bar(rollout.ready, rollout.updated, rollout.replicas))
    cell.append(f" {rollout.ready}/{rollout.replicas}")
    if rollout.outdated:
        cell.append(f" old {rollout.outdated}", style="dim")
    return cell


def rollout_text(rollout: schemas.RolloutStatus) -> Text:
    """A rollout in words, for the TUI's detail line and every describe page."""
    text = Text()
    if not rollout_in_progress(rollout):
        text.append(f"generation {rollout.generation}: no rollout in progress · {rollout.ready}/{rollout.replicas} "
                    "ready", style="dim")
        return text
    text.append(f"rollout to gen {rollout.generation}: ", style="bold")
    text.append_text(fmt.rollout_bar(rollout.ready, rollout.updated, rollout.replicas, 8))
    text.append(f" {rollout.updated}/{rollout.replicas} new, {rollout.ready} ready")
    if rollout.outdated:
        text.append(f" · old {rollout.outdated} ({rollout.available - rollout.ready} serving)", style="dim")
    if rollout.paused:
        text.append(" · PAUSED (p resumes)", style="bold yellow")
    if rollout.message:
        text.append(f"\n ⚠ {rollout.message}", style="bold red")
    return text


def estimate_lines(estimate: schemas.MemoryEstimateOut | None) -> list[str]:
    """The scheduler's memory estimate in words (model describe, dry runs, instance describe)."""
    if estimate is None:
        return []
    context = ""
    if estimate.max_model_len:
        context = f" for {estimate.max_model_len} tokens"
        if estimate.concurrency and estimate.concurrency > 1:
            context += f" x {estimate.concurrency} sequences"
    lines = [f"{iec_bytes(estimate.total_bytes)} on one device = weights {iec_bytes(estimate.weights_bytes)}"
             f" + KV cache {iec_bytes(estimate.kv_cache_bytes)}{context}"
             f" + overhead {iec_bytes(estimate.overhead_bytes)} (weights from: {estimate.method})"]
    if estimate.tensor_parallel_sizes:
        lines.append(f"TP sizes: {', '.join(map(str, estimate.tensor_parallel_sizes))}")
    lines += [f"Note: {note}" for note in estimate.notes]
    return lines


def placement_text(spec: schemas.ModelSpec) -> str:
    return (spec.placement_strategy + (", distributed" if spec.distributed else "")
            + (f", selector {spec.worker_selector}" if spec.worker_selector else "")
            + (f", gpu_type {spec.gpu_type}" if spec.gpu_type else "")
            + (", manual: " + "; ".join(f"{s.worker} GPU {s.gpu_indexes}" for s in spec.gpu_selector)
               if spec.gpu_selector else ""))


def describe(model: schemas.ModelOut, *, instances: list[schemas.InstanceOut], events: Iterable[schemas.EventOut],
             rollout: schemas.RolloutStatus | None, now: datetime, ready: int | None = None,
             estimate: schemas.MemoryEstimateOut | None = None, estimate_error: str | None = None) -> RenderableType:
    """`maas model describe` and the TUI's describe screen: fields, rollout, memory, instances, events."""
    from maas_tui.render.instances import reasons_table

    ready = model.ready_replicas if ready is None else ready
    spec = model.spec
    fields = grid()
    fields.add_row("Name", Text(model.name))
    fields.add_row("State", fmt.state_text(model.state))
    fields.add_row("Replicas", Text(f"{ready}/{model.replicas} ready",
                                    style="green" if ready >= model.replicas else "yellow"))
    fields.add_row("Generation", f"{model.generation}  (max surge {model.max_surge}, max unavailable "
                                 f"{model.max_unavailable})")
    if rollout is not None:
        fields.add_row("Rollout", rollout_text(rollout))
    if model.max_replicas is not None:  # manual models: the Replicas line says it all
        fields.add_row("Autoscaling", scaling_text(model, now, ready))
    if model.priority != "normal":
        fields.add_row("Priority", Text(model.priority))
    fields.add_row("Backend", Text(spec.backend + (f" {spec.backend_version}" if spec.backend_version else "")))
    fields.add_row("Source", Text(spec.source))
    fields.add_row("Context", str(spec.context_length))
    fields.add_row("CPU only", "yes" if spec.cpu_only else "no")
    fields.add_row("Placement", Text(placement_text(spec)))
    if spec.args:
        fields.add_row("Args", Text(" ".join(spec.args)))
    for number, line in enumerate(estimate_lines(estimate)):
        fields.add_row("Memory" if number == 0 else "", line)
    if estimate_error:
        fields.add_row("Memory", Text(f"cannot estimate: {estimate_error}"))
    fields.add_row("Age", fmt.age(model.created_at, now))
    table = small_table("INSTANCE", "STATE", "WORKER", "PLACEMENT", "PORT", "RST")
    for inst in instances:
        table.add_row(Text(inst.name), fmt.instance_state_text(inst), Text(inst.worker_name or "-"),
                      claim_cell(inst.claim), str(inst.port or "-"), str(inst.restart_count))
    parts: list[Any] = [fields, Text(""), section("Instances"), table]
    for inst in instances:
        if inst.schedule_reasons:
            parts += [Text(""), section(f"Why {inst.name} is not scheduled"), reasons_table(inst.schedule_reasons)]
    return Group(*parts, Text(""), section("Events"), events_table(events, now))


def document_of(model: schemas.ModelOut) -> dict[str, Any]:
    """`maas model get NAME -o yaml|json`: what `maas apply -f` takes back unchanged (it ignores status)."""
    spec = model.spec.model_dump(mode="json", exclude_none=True) | {
        "replicas": model.replicas, "max_surge": model.max_surge, "max_unavailable": model.max_unavailable}
    spec |= model.model_dump(mode="json", include=set(schemas.SCALING_FIELDS), exclude_none=True)
    status = {"state": str(model.state), "generation": model.generation, "ready_replicas": model.ready_replicas,
              "paused": model.paused, "rollout_message": model.rollout_message}
    if model.max_replicas is not None:
        status |= {"desired_replicas": model.replicas, "scale_reason": model.scale_reason,
                   "scaled_at": model.scaled_at.isoformat() if model.scaled_at else None}
    metadata = ("team", "id", "created_at", "updated_at") if model.team is not None else ("id", "created_at", "updated_at")
    return document(KIND, model, spec, status, metadata)
