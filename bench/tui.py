"""TUI frame time: 250 SIMULATED workers x 4 GPUs whose utilisation changes every second.

Each frame is one second of the cluster: 250 worker updates arrive as watch-stream JSON lines.
The time measured is from the first line being parsed to the terminal bytes of the re-rendered
screen being produced: JSON decode + `WatchMessage` validation + state update + the visible view's
refresh + Textual's compositor + rendering the update to terminal escape sequences (headless, so
nothing is written). The app's 50 ms coalescing delay is not counted (it is set to 0 here); Textual's
own frame pacing (at most 60 updates a second) is. Also measured: a page of scrolling in the heatmap.

    .venv/bin/python bench/tui.py [--frames 60] [--size 120x40]

Prints a table and, last, `RESULT frame_p95_ms=<n>` (the dashboard heatmap at the given size).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textual._compositor import CompositorUpdate  # noqa: E402

from maas_tui.tui.app import MaasApp  # noqa: E402
from maas_tui.tui.demo import DemoClient, make_worker  # noqa: E402
from maas_tui.tui.state import ClusterState  # noqa: E402
from server import schemas  # noqa: E402

WORKERS = 250
GPUS = 4


class TimedApp(MaasApp):
    """Records when each screen update has been turned into terminal output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.displays = 0
        self.last_display = 0.0
        self.output_bytes = 0

    def _display(self, screen: Any, renderable: Any) -> None:
        super()._display(screen, renderable)
        if renderable is None:
            return
        if isinstance(renderable, CompositorUpdate):
            # Headless skips the terminal write; do the same rendering work a real terminal costs.
            self.output_bytes += len(renderable.render_segments(self.console))
        self.displays += 1
        self.last_display = time.perf_counter()


def cluster() -> ClusterState:
    state = ClusterState()
    for wid in range(1, WORKERS + 1):
        worker = make_worker(wid, f"sim-{wid:03d}", [("H100-80GB", 80)] * GPUS, 0.0)
        state.apply_event("workers", "created", worker.model_dump(mode="json"))
    state.version = 1
    return state


def frame_lines(second: int, version: int) -> list[bytes]:
    """One second of watch stream: every worker's heartbeat with new utilisation (JSON lines)."""
    lines = []
    for wid in range(1, WORKERS + 1):
        worker = make_worker(wid, f"sim-{wid:03d}", [("H100-80GB", 80)] * GPUS, float(second))
        version += 1
        lines.append(json.dumps({"type": "event", "version": version, "kind": "workers", "action": "updated",
                                 "object": worker.model_dump(mode="json")}).encode())
    return lines


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def wait_display(app: TimedApp, before: int, timeout: float = 5.0) -> float:
    deadline = time.perf_counter() + timeout
    while app.displays <= before:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no re-render within 5 s (displays={app.displays}, screen={app.screen})")
        await asyncio.sleep(0)
    return app.last_display


async def measure(view: str, size: tuple[int, int], frames: int) -> dict[str, Any]:
    state = cluster()
    app = TimedApp(DemoClient(state), state=state, watch=False, start=view, refresh_delay=0.0, tick=0,
                   freeze_gc=True)
    apply_ms: list[float] = []
    frame_ms: list[float] = []
    cpu_ms: list[float] = []
    scroll_ms: list[float] = []
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        version = 1
        prepared = [frame_lines(second, version + second * WORKERS) for second in range(1, frames + 3)]
        app.settle_memory()  # what `maas tui` does after the first snapshot
        for index, lines in enumerate(prepared):
            await pilot.pause()
            before = app.displays
            cpu0 = time.process_time()
            start = time.perf_counter()
            for line in lines:
                app.apply_message(schemas.WatchMessage.model_validate(json.loads(line)))
            applied = time.perf_counter()
            done = await wait_display(app, before)
            cpu = time.process_time() - cpu0
            if index >= 2:  # the first frames warm caches
                apply_ms.append((applied - start) * 1000)
                frame_ms.append((done - start) * 1000)
                cpu_ms.append(cpu * 1000)
        if view == "dash":
            from maas_tui.tui.heatmap import GpuHeatmap

            heatmap = app.screen.query_one(GpuHeatmap)
            for _ in range(20):
                await pilot.pause()
                before = app.displays
                key = "home" if heatmap.cursor >= len(heatmap.rows) - 1 else "pagedown"
                start = time.perf_counter()
                await pilot.press(key)
                done = await wait_display(app, before)
                scroll_ms.append((done - start) * 1000)
        rows = len(app.state.workers)
    gc.unfreeze()
    return {"view": view, "size": f"{size[0]}x{size[1]}", "workers": rows, "apply": apply_ms, "frame": frame_ms,
            "cpu": cpu_ms, "scroll": scroll_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", default="120x40")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    runs = [("dash", (width, height)), ("dash", (80, 24)), ("workers", (width, height)), ("gpus", (width, height))]
    results = [asyncio.run(measure(view, size, args.frames)) for view, size in runs]

    print(f"TUI frame time: {WORKERS} simulated workers x {GPUS} GPUs, {args.frames} one-second updates each "
          f"({WORKERS} worker events per frame)")
    header = f"{'view':<8} {'size':>7} {'apply p50':>10} {'frame p50':>10} {'frame p95':>10} {'frame max':>10} " \
             f"{'cpu p95':>8} {'scroll p95':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        scroll = f"{pct(r['scroll'], 0.95):.1f}" if r["scroll"] else "-"
        print(f"{r['view']:<8} {r['size']:>7} {statistics.median(r['apply']):>10.1f} "
              f"{statistics.median(r['frame']):>10.1f} {pct(r['frame'], 0.95):>10.1f} {max(r['frame']):>10.1f} "
              f"{pct(r['cpu'], 0.95):>8.1f} {scroll:>11}")
    print("(milliseconds; apply = parse + validate + state update for 250 events; frame = apply + refresh + "
          "composite + terminal render)")
    print(f"RESULT frame_p95_ms={pct(results[0]['frame'], 0.95):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
