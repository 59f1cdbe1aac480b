"""Workers and their GPUs: the table columns, the per-GPU detail lines, the describe page, the document."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.claims import claim_cell
from maas_tui.render.common import Column, Row, document, events_table, grid, section, small_table
from server import schemas

if TYPE_CHECKING:
    from maas_tui.tui.state import ClusterState

KIND = "Worker"
COLUMNS: list[Column] = [("NAME", None), ("STATE", None), ("GPUS", None), ("VRAM USED", None), ("CLAIMED", None),
                         ("UTIL", None), ("CPU", None), ("RAM", None), ("BEAT", None)]
WIDE_COLUMNS: list[Column] = [("ADDRESS", None), ("INSTANCES", None), ("LABELS", 40), ("AGE", None)]
GPU_COLUMNS: list[Column] = [("WORKER", None), ("GPU", None), ("NAME", None), ("UTIL", None), ("MEM USED", None),
                             ("CLAIMED", None), ("TEMP", None), ("INSTANCES", None)]
GPU_WIDE_COLUMNS: list[Column] = [("VENDOR", None), ("UUID", None)]


def state_cell(w: schemas.WorkerOut) -> Text:
    cell = fmt.state_text(w.state)
    if w.draining:
        cell.append(",draining", style="bold yellow")
    elif w.cordoned:
        cell.append(",cordoned", style="yellow")
    return cell


def rows(state: "ClusterState", now: datetime, wide: bool = True) -> Iterable[Row]:
    """Every worker; the INSTANCES count only when `wide` (it is the one costly cell)."""
    for w in state.sorted_workers():
        gpus = w.gpus
        sim = " sim" if any(g.simulated for g in gpus) else ""
        used = sum(g.memory_used for g in gpus)
        total = sum(g.memory_total for g in gpus)
        claimed = sum(state.claimed_bytes(w.id, g.index) for g in gpus)
        util = sum(g.utilization for g in gpus) / len(gpus) if gpus else None
        ram = f"{fmt.gb(w.host.memory_used)}/{fmt.gb(w.host.memory_total)}G"
        yield w.name, (
            w.name, state_cell(w), f"{len(gpus)}{sim}",
            f"{fmt.gb(used)}/{fmt.gb(total)}G" if gpus else "-",
            f"{fmt.gb(claimed, 1)}G" if claimed else "-",
            f"{util:.0f}%" if util is not None else "-",
            f"{w.host.cpu_percent:.0f}%", ram, fmt.age(w.last_heartbeat_at, now),
            f"{w.address}:{w.agent_port}", str(len(state.instances_on(w.id))) if wide else "",
            ",".join(f"{k}={v}" for k, v in sorted(w.labels.items())) or "-", fmt.age(w.created_at, now))


def gpu_rows(state: "ClusterState") -> Iterable[Row]:
    claims = state.gpu_claims()
    for w in state.sorted_workers():
        for g in w.gpus:
            holders = claims.get((w.id, g.index), [])
            claimed = sum(i.claim.vram_bytes_per_gpu for i in holders if i.claim)
            name = fmt.truncate(g.name.replace(" (simulated)", ""), 16)
            name_cell = name + " sim" if g.simulated else name
            util = Text(f"{g.utilization:>3.0f}%", style=fmt.cell_style(g.utilization))
            yield f"{w.name}/{g.index}", (
                w.name, str(g.index), name_cell, util, f"{fmt.gb(g.memory_used)}/{fmt.gb(g.memory_total)}G",
                f"{fmt.gb(claimed, 1)}G" if holders else "-",
                f"{g.temperature:.0f}°C" if g.temperature is not None else "-",
                fmt.truncate(",".join(i.name for i in holders) or "-", 18), g.vendor,
                g.uuid or "-")


def gpu_detail(state: ClusterState, worker: schemas.WorkerOut | None, width: int) -> Text:
    """The selected worker's GPUs, one line each: history sparkline, utilisation, memory, claims."""
    text = Text()
    if worker is None:
        text.append(" no workers yet — start an agent: maas agent --server-url URL --token TOKEN", style="dim")
        return text
    sim = any(g.simulated for g in worker.gpus)
    text.append(f" {worker.name}", style="bold")
    text.append(f"  {worker.state}", style=fmt.STATE_STYLES.get(worker.state, ""))
    text.append(f"  {len(worker.gpus)} GPU{'s' if len(worker.gpus) != 1 else ''}{' (simulated)' if sim else ''}",
                style="italic yellow" if sim else "")
    host = worker.host
    cpu_hist = list(state.cpu.get(worker.id, ()))
    text.append(f"  CPU {host.cpu_percent:.0f}% ", style="")
    text.append(fmt.sparkline(cpu_hist, 12), style="cyan")
    text.append(f"  RAM {fmt.gb(host.memory_used, 1)}/{fmt.gb(host.memory_total)}G")
    claims = state.gpu_claims()
    spark_width = max(6, width - 60)
    for gpu in worker.gpus:
        text.append("\n")
        name = gpu.name.replace(" (simulated)", "")
        text.append(f" GPU{gpu.index:<2}", style="bold")
        text.append(f"{fmt.truncate(name, 12):<12} ", style="")
        history = list(state.gpu_util.get((worker.id, gpu.index), ()))
        text.append(fmt.sparkline(history, spark_width), style=Style(color=fmt.percent_color(gpu.utilization)))
        text.append(f" {gpu.utilization:>3.0f}%", style="bold")
        text.append(f"  used {fmt.gb(gpu.memory_used)}/{fmt.gb(gpu.memory_total)}G", style="")
        holders = claims.get((worker.id, gpu.index), [])
        claimed = sum(i.claim.vram_bytes_per_gpu for i in holders if i.claim)
        text.append(f"  claim {fmt.gb(claimed, 1)}G" if holders else "  claim -", style="yellow" if holders else "dim")
        text.append(f"  {gpu.temperature:.0f}°C" if gpu.temperature is not None else "  --°C", style="dim")
    if not worker.gpus:
        text.append("\n no GPUs: CPU backends (llama.cpp) serve from host RAM", style="dim")
    return text


def gpu_nvml_table(worker: schemas.WorkerOut) -> Any:
    """Per GPU what NVML adds (UUID, power, MIG mode, the processes on it), or None when the agent gave none
    (simulated GPUs, CPU-only hosts)."""
    from rich.table import Table

    gpus = [g for g in worker.gpus if g.power_watts is not None or g.mig_mode is not None or g.processes]
    if not gpus:
        return None
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    for column in ("GPU", "POWER", "MIG", "PROCESSES (pid memory)"):
        table.add_column(column, no_wrap=column != "PROCESSES (pid memory)")
    for g in gpus:
        processes = ", ".join(f"{p.pid} {fmt.human_bytes(p.used_memory)}" if p.used_memory is not None else str(p.pid)
                              for p in g.processes) or "-"
        table.add_row(f"{g.index} {fmt.truncate(g.uuid or '', 12)}",
                      f"{g.power_watts:.0f} W" if g.power_watts is not None else "-",
                      {True: "on", False: "off", None: "-"}[g.mig_mode], processes)
    return table


def describe(worker: schemas.WorkerOut, *, state: "ClusterState", events: Iterable[schemas.EventOut], now: datetime,
             width: int = 80) -> RenderableType:
    """`maas worker describe` and the TUI's describe screen: host, GPUs with their claims, instances, events."""
    fields = grid()
    fields.add_row("Name", Text(worker.name))
    state_text = fmt.state_text(worker.state)
    if worker.state_message:
        state_text.append(f"  {worker.state_message}", style="dim")
    fields.add_row("State", state_text)
    fields.add_row("Cordoned", "yes, draining: its instances move away" if worker.draining else
                   "yes: no new instances" if worker.cordoned else "no")
    fields.add_row("Address", f"{worker.address} (agent port {worker.agent_port})")
    fields.add_row("Heartbeat", f"{fmt.age(worker.last_heartbeat_at, now)} ago")
    host = worker.host
    fields.add_row("Host", Text(f"{host.hostname or '-'} · {host.os or '-'} · {host.cpu_count} CPUs"))
    fields.add_row("CPU", Text.assemble(fmt.bar(host.cpu_percent, 20), f" {host.cpu_percent:.0f}%"))
    ram = 100.0 * host.memory_used / host.memory_total if host.memory_total else 0.0
    fields.add_row("RAM", Text.assemble(fmt.bar(ram, 20), f" {fmt.gb(host.memory_used, 1)}/{fmt.gb(host.memory_total)} GB"))
    if worker.labels:
        fields.add_row("Labels", Text(", ".join(f"{k}={v}" for k, v in sorted(worker.labels.items()))))
    instances = small_table("INSTANCE", "STATE", "PLACEMENT", "PORT")
    for inst in state.instances_on(worker.id):
        instances.add_row(Text(inst.name), fmt.instance_state_text(inst), claim_cell(inst.claim), str(inst.port or "-"))
    nvml = gpu_nvml_table(worker)
    extra = [Text(""), section("GPU power, MIG and processes (NVML)"), nvml] if nvml is not None else []
    return Group(fields, Text(""), section("GPUs"), gpu_detail(state, worker, width), *extra, Text(""),
                 section("Instances"), instances, Text(""), section("Events"), events_table(events, now))


def document_of(worker: schemas.WorkerOut) -> dict[str, Any]:
    """`maas worker get NAME -o yaml|json`: what an operator sets as spec, what the agent reports as status."""
    data = worker.model_dump(mode="json", exclude_none=True)
    spec_keys = ("labels", "cordoned", "draining")
    spec = {k: data[k] for k in spec_keys}
    status = {k: v for k, v in data.items() if k not in spec_keys + ("id", "name", "created_at", "updated_at")}
    return document(KIND, worker, spec, status)
