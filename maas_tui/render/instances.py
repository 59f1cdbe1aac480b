"""Instances: the table columns, the one-line reason, why-not-scheduled, the describe page, the document."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.claims import claim_cell, claim_text
from maas_tui.render.common import Column, Row, document, events_table, grid, section, small_table
from maas_tui.render.format import iec_bytes
from server import schemas

if TYPE_CHECKING:
    from maas_tui.tui.state import ClusterState

KIND = "Instance"
# RST: restarts (80 columns); the model is in the instance's name, and in wide mode.
COLUMNS: list[Column] = [("NAME", None), ("STATE", None), ("WORKER", None), ("PLACEMENT", None), ("PORT", None),
                         ("RST", None), ("AGE", None)]
WIDE_COLUMNS: list[Column] = [("MODEL", None), ("GEN", None), ("ADDRESS", None), ("PID", None)]


def rows(state: "ClusterState", now: datetime) -> Iterable[Row]:
    for i in state.sorted_instances():
        yield i.name, (i.name, fmt.instance_state_text(i), i.worker_name or "-", claim_cell(i.claim),
                       str(i.port) if i.port else "-", str(i.restart_count), fmt.age(i.created_at, now),
                       i.model_name, str(i.generation), i.address or "-", str(i.pid) if i.pid else "-")


def reason_line(inst: schemas.InstanceOut) -> Text:
    """The instance's state and why, in one line (the TUI shows it under the table)."""
    text = Text()
    text.append(f" {inst.name} ", style="bold")
    text.append_text(fmt.instance_state_text(inst))
    if inst.state_message:
        text.append(": " + " ".join(inst.state_message.split())[:300], style="red" if inst.state == "error" else "")
    elif inst.schedule_reasons:
        reasons = "; ".join(f"{r.worker or 'all'}: {r.message}" for r in inst.schedule_reasons)
        text.append(f": not scheduled: {reasons}"[:300], style="yellow")
    elif inst.state == "running":
        text.append(f" on {inst.worker_name} at {inst.address}:{inst.port}", style="dim")
    return text


def reasons_table(reasons: list[schemas.UnschedulableReason]) -> Table:
    """Why an instance (or a dry-run replica) cannot be placed: per worker, the reason and the numbers."""
    table = small_table("WORKER", "REASON", "NEED", "FREE", "GPU", "MESSAGE")
    for r in reasons:
        worker = r.worker or ("cluster" if r.count is None else f"({r.count} workers)")
        gpu = "" if r.gpu is None else str(r.gpu)
        if r.gpus_needed:
            gpu += f" ({r.gpus_fitting or 0}/{r.gpus_needed} fit)"
        table.add_row(Text(worker), Text(r.reason), iec_bytes(r.need_bytes), iec_bytes(r.free_bytes), gpu,
                      Text(r.message))
    return table


def describe(inst: schemas.InstanceOut, *, events: Iterable[schemas.EventOut], now: datetime,
             activity: Any = None) -> RenderableType:
    """`maas instance describe` and the TUI's describe screen; `activity`: its InstanceHistory from
    GET /v2/telemetry (claimed vs actual memory, traffic), where the caller fetched it."""
    from maas_tui.render.models import estimate_lines
    from maas_tui.render import telemetry

    fields = grid()
    fields.add_row("Name", Text(inst.name))
    fields.add_row("ID", str(inst.id))
    fields.add_row("Model", Text(f"{inst.model_name}  (generation {inst.generation})"))
    fields.add_row("State", fmt.instance_state_text(inst))
    if inst.state_message:
        fields.add_row("Message", Text(inst.state_message.strip()[-600:], style="red" if inst.state == "error" else ""))
    fields.add_row("Worker", Text(inst.worker_name or "-  (not scheduled)"))
    fields.add_row("Endpoint", f"{inst.address}:{inst.port}" if inst.port else "-")
    fields.add_row("PID", str(inst.pid) if inst.pid else "-")
    fields.add_row("Claim", Text(claim_text(inst.claim)))
    for number, line in enumerate(estimate_lines(inst.claim.estimate if inst.claim else None)):
        fields.add_row("Memory" if number == 0 else "", line)
    if activity is not None:
        fields.add_row("Actual", telemetry.memory_line(activity.memory))
        fields.add_row("Traffic", telemetry.instance_activity(activity))
    fields.add_row("Restarts", str(inst.restart_count))
    fields.add_row("Backend", Text(f"{inst.spec.backend} · ctx {inst.spec.context_length}"
                                   f"{' · cpu only' if inst.spec.cpu_only else ''}"))
    fields.add_row("Source", Text(inst.spec.source))
    if inst.spec.args:
        fields.add_row("Args", Text(" ".join(inst.spec.args)))
    fields.add_row("Age", f"{fmt.age(inst.created_at, now)} (updated {fmt.age(inst.updated_at, now)} ago)")
    parts: list[Any] = [fields]
    if inst.schedule_reasons:
        parts += [Text(""), Text("Why it is not scheduled", style="bold yellow"), reasons_table(inst.schedule_reasons)]
    return Group(*parts, Text(""), section("Events"), events_table(events, now))


def document_of(inst: schemas.InstanceOut) -> dict[str, Any]:
    """`maas instance get NAME -o yaml|json`: the model's spec it runs; where and how it runs as status."""
    data = inst.model_dump(mode="json", exclude_none=True)
    spec = {"model": inst.model_name, "generation": inst.generation} | inst.spec.model_dump(mode="json",
                                                                                             exclude_none=True)
    status = {k: v for k, v in data.items() if k not in ("id", "name", "model_id", "model_name", "generation", "spec",
                                                         "created_at", "updated_at")}
    return document(KIND, inst, spec, status)
