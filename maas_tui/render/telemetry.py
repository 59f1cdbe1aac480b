"""Telemetry history as graphs (braille and block sparklines), `maas top`'s frame, and the claimed vs
actual memory lines of describe pages. Pure: data in, Rich renderables out (the TUI and the CLI both
use them)."""

from __future__ import annotations

from typing import Iterable, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from maas_tui.render import format as fmt
from server import schemas
from server.schemas.telemetry import GPUHistory, InstanceHistory, InstanceMemory, TelemetryHistory

# Braille cell: dots 1-3 and 7 in the left column (top to bottom), 4-6 and 8 in the right.
_LEFT = (0x01, 0x02, 0x04, 0x40)
_RIGHT = (0x08, 0x10, 0x20, 0x80)


def present(values: Sequence[float | None]) -> list[float]:
    """Gaps (buckets without a report) drawn as the value before them (0 at the start)."""
    out, last = [], 0.0
    for value in values:
        last = value if value is not None else last
        out.append(last)
    return out


def braille(values: Sequence[float | None], width: int, height: int, high: float) -> list[str]:
    """An area chart `width` cells wide and `height` rows high (2 x 4 dots per cell), newest on the right;
    0..high, the last 2*width values."""
    samples = present(values)[-2 * width:]
    samples = [0.0] * (2 * width - len(samples)) + samples
    dots = height * 4
    levels = [0 if high <= 0 else round(max(0.0, min(1.0, v / high)) * dots) for v in samples]
    rows = []
    for row in range(height):
        line = []
        bottom = (height - 1 - row) * 4  # dots below this row
        for cell in range(width):
            code = 0x2800
            for column, bits in ((levels[2 * cell], _LEFT), (levels[2 * cell + 1], _RIGHT)):
                filled = max(0, min(4, column - bottom))
                for i in range(filled):
                    code |= bits[3 - i]
            line.append(chr(code))
        rows.append("".join(line))
    return rows


def sparkline(values: Sequence[float | None], width: int, high: float | None = None, gaps_as_zero: bool = False) -> str:
    """Block characters; a bucket without a value repeats the one before (a gauge) or, with
    `gaps_as_zero`, is 0 (latency: no request in it)."""
    samples = [v or 0.0 for v in values] if gaps_as_zero else present(values)
    top = high if high is not None else max(samples, default=0.0) or 1.0
    return fmt.sparkline(samples, width, top)


def last(values: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(values) if v is not None), None)


def recent(values: Sequence[float | None], step: float, seconds: float = 60.0) -> float | None:
    """The mean over the last `seconds` (rates and latency read better over a minute than one 5 s bucket)."""
    window = [v for v in values[-max(1, int(seconds // max(step, 1e-9))):] if v is not None]
    return sum(window) / len(window) if window else None


def binary_pair(used: float, claimed: float) -> str:
    """`14.0/17.2 GiB`, `220/64 MiB`: one unit for both (narrow tables)."""
    if max(used, claimed) >= 1 << 30:
        return f"{used / (1 << 30):.1f}/{claimed / (1 << 30):.1f} GiB"
    return f"{used / (1 << 20):.0f}/{claimed / (1 << 20):.0f} MiB"


def binary_bytes(value: float | None) -> str:
    """MiB and GiB, as `--memory` takes them."""
    value = float(value or 0)
    if value >= 1 << 30:
        return f"{value / (1 << 30):.1f} GiB"
    return f"{value / (1 << 20):.0f} MiB"


def graph(title: str, values: Sequence[float | None], width: int, height: int, high: float, now: str) -> Text:
    text = Text()
    text.append(f"{title}  ", style="bold")
    text.append(now)
    for line in braille(values, width, height, high):
        text.append("\n")
        text.append(line, style="cyan")
    return text


def gpu_graphs(history: GPUHistory | None, memory_total: int, width: int = 60, height: int = 3) -> RenderableType:
    """A GPU's last hour: utilisation, memory, power, temperature (braille)."""
    if history is None or not history.t:
        return Text("no history on this server yet (it keeps what heartbeats bring from now on)", style="dim")
    span = f"{len(history.t)} points, {_span(history.t)}"
    util, mem = last(history.utilization), last(history.memory_used)
    parts: list[RenderableType] = [Text(span, style="dim"),
                                   graph("utilisation", history.utilization, width, height, 100.0,
                                         f"{util:.0f}%" if util is not None else "-"),
                                   graph("memory used", history.memory_used, width, height, float(memory_total or 1),
                                         f"{fmt.gb(mem, 1)}/{fmt.gb(memory_total)} GB" if mem is not None else "-")]
    if any(v is not None for v in history.power_watts):
        watts = [v for v in history.power_watts if v is not None]
        parts.append(graph("power", history.power_watts, width, max(1, height - 1), max(watts) * 1.1,
                           f"{last(history.power_watts):.0f} W"))
    if any(v is not None for v in history.temperature):
        parts.append(graph("temperature", history.temperature, width, max(1, height - 1), 100.0,
                           f"{last(history.temperature):.0f}°C"))
    return Group(*parts)


def _span(t: Sequence[float]) -> str:
    seconds = (t[-1] - t[0]) if len(t) > 1 else 0
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def memory_line(memory: InstanceMemory | None) -> Text:
    """`claim 64 MiB, uses 231 MiB (host RSS) 344%  over its claim: deploy with --memory 320MiB`."""
    if memory is None:
        return Text("not reported (no process, or the GPU driver does not say what each process uses)", style="dim")
    text = Text(f"claim {binary_bytes(memory.claimed_bytes)}, uses {binary_bytes(memory.used_bytes)} "
                f"({'host RSS' if memory.device == 'cpu' else 'NVML'})")
    if memory.ratio is not None:
        text.append(f" {memory.ratio * 100:.0f}%", style="bold red" if memory.drift == "over" else
                    "yellow" if memory.drift == "under" else "green")
    if memory.drift:
        text.append(f"  {memory.drift} its claim: deploy with --memory {memory.suggested_memory}",
                    style="red" if memory.drift == "over" else "yellow")
    if memory.per_gpu:
        text.append("  per GPU: " + ", ".join(f"{i}: {binary_bytes(u)}/{binary_bytes(c)}"
                                             for i, (c, u) in sorted(memory.per_gpu.items())), style="dim")
    return text


def instance_activity(history: InstanceHistory | None, width: int = 10, step: float = 5.0) -> Text:
    """One line: requests/s, tokens/s and latency sparklines with their means over the last minute."""
    if history is None or not history.t:
        return Text("no requests through this server yet", style="dim")
    text = Text()
    for label, values, unit in (("req/s", history.requests_per_s, ""), ("tok/s", history.tokens_per_s, ""),
                                ("latency", history.latency_s, "s")):
        current = recent(values, step)
        text.append(f"{label} ", style="bold")
        text.append(sparkline(values, width, gaps_as_zero=True), style="cyan")
        text.append(f" {current:.2f}{unit}  " if current is not None else " -  ")
    return text


# --- maas top --------------------------------------------------------------------------------------


def _bar(value: float, width: int) -> Text:
    return fmt.bar(value, width)


def top_frame(workers: Iterable[schemas.WorkerOut], instances: Iterable[schemas.InstanceOut],
              history: TelemetryHistory, width: int = 100, server: str = "") -> RenderableType:
    """nvitop-like: per worker and GPU utilisation and memory bars with their history; then the instances
    with requests/s, tokens/s, latency and memory against their claim."""
    by_gpu = {(h.worker_id, h.gpu): h for h in history.gpus}
    by_instance = {h.instance_id: h for h in history.instances}
    spark = max(8, min(40, width - 70))
    out: list[RenderableType] = [Text(f"maas top  {server}  (history: this server, {history.step_seconds:g} s buckets)",
                                      style="bold")]
    gpus = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    for column in ("WORKER", "GPU", "UTIL", "", "MEMORY", "", "TEMP", "POWER", "HISTORY (util)"):
        gpus.add_column(column, no_wrap=True)
    for worker in workers:
        if not worker.gpus:
            ram = 100.0 * worker.host.memory_used / worker.host.memory_total if worker.host.memory_total else 0.0
            gpus.add_row(Text(worker.name, style="bold"), "cpu", _bar(worker.host.cpu_percent, 10),
                         f"{worker.host.cpu_percent:3.0f}%", _bar(ram, 10),
                         f"{fmt.gb(worker.host.memory_used, 1)}/{fmt.gb(worker.host.memory_total)}G", "-", "-",
                         Text(str(worker.state), style=fmt.STATE_STYLES.get(str(worker.state), "")))
        for gpu in worker.gpus:
            h = by_gpu.get((worker.id, gpu.index))
            util = last(h.utilization) if h else None
            util = gpu.utilization if util is None else util
            used = last(h.memory_used) if h else None
            used = gpu.memory_used if used is None else used
            memory = 100.0 * used / gpu.memory_total if gpu.memory_total else 0.0
            temp = (last(h.temperature) if h else None) or gpu.temperature
            power = (last(h.power_watts) if h else None) or gpu.power_watts
            gpus.add_row(Text(worker.name, style="bold"), f"{gpu.index}{' sim' if gpu.simulated else ''}",
                         _bar(util, 10), f"{util:3.0f}%", _bar(memory, 10),
                         f"{fmt.gb(used, 1)}/{fmt.gb(gpu.memory_total)}G",
                         f"{temp:.0f}°C" if temp is not None else "-", f"{power:.0f}W" if power is not None else "-",
                         Text(sparkline(h.utilization, spark, 100.0) if h else "", style="cyan"))
    out.append(gpus)
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    for column in ("INSTANCE", "WORKER", "STATE", "REQ/S", "TOK/S", "LATENCY", "MEM/CLAIM", "HISTORY (req/s)"):
        table.add_column(column, no_wrap=True)
    for instance in instances:
        h = by_instance.get(instance.id)
        step = history.step_seconds
        rate = recent(h.requests_per_s, step) if h else None
        tokens = recent(h.tokens_per_s, step) if h else None
        latency = recent(h.latency_s, step) if h else None
        memory = h.memory if h else None
        mem_cell = Text(binary_pair(memory.used_bytes, memory.claimed_bytes),
                        style="red" if memory.drift == "over" else "yellow" if memory.drift == "under" else "") \
            if memory else Text("-")
        table.add_row(Text(instance.name), instance.worker_name or "-", fmt.instance_state_text(instance),
                      f"{rate:.2f}" if rate is not None else "-", f"{tokens:.1f}" if tokens is not None else "-",
                      f"{latency * 1000:.0f}ms" if latency is not None else "-", mem_cell,
                      Text(sparkline(h.requests_per_s, spark) if h else "", style="cyan"))
    out.extend([Text(""), table])
    return Group(*out)


def model_activity(history: TelemetryHistory | None, spark: int = 12) -> RenderableType:
    """A model's instances on the describe page: requests/s (history and now), tokens/s, latency and
    memory used against the claim, with a suggested --memory where it drifts."""
    title = Text("Traffic and memory", style="bold")
    if history is None:
        return Group(title, Text("loading…", style="dim"))
    if not history.instances:
        return Group(title, Text("no running instance has history on this server yet", style="dim"))
    title.append(f"  (this server, {_span(history.instances[0].t) if history.instances[0].t else 'no points'})",
                 style="dim")
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    for column in ("INSTANCE", "REQ/S", "TOK/S", "LATENCY", "MEM/CLAIM"):
        table.add_column(column, no_wrap=True)
    hints = []
    for h in history.instances:
        step = history.step_seconds
        rate, tokens, latency = (recent(v, step) for v in (h.requests_per_s, h.tokens_per_s, h.latency_s))
        rate_cell = Text(sparkline(h.requests_per_s, spark), style="cyan")
        rate_cell.append(f" {rate:.1f}" if rate is not None else " -")
        memory = h.memory
        if memory is None:
            mem_cell = Text("-", style="dim")
        else:
            mem_cell = Text(binary_pair(memory.used_bytes, memory.claimed_bytes))
            if memory.ratio is not None:
                mem_cell.append(f" {memory.ratio * 100:.0f}%", style="bold red" if memory.drift == "over" else
                                "yellow" if memory.drift == "under" else "green")
            if memory.drift:
                hints.append(Text(f"{h.instance}: {memory.drift} its claim; deploy with --memory "
                                  f"{memory.suggested_memory}", style="red" if memory.drift == "over" else "yellow"))
        table.add_row(Text(fmt.truncate(h.instance, 22)), rate_cell,
                      f"{tokens:.0f}" if tokens is not None else "-",
                      f"{latency * 1000:.0f}ms" if latency is not None else "-", mem_cell)
    return Group(title, table, *hints)
