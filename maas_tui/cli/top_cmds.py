"""`maas top` (an nvitop-like live view of the cluster in the plain terminal: Rich Live, no Textual,
for scripts and SSH) and `maas doctor` (each agent's environment checks, and a support bundle)."""

from __future__ import annotations

import asyncio
import io
import json
import platform
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

import typer

from maas_tui.cli.output import Format, OutputOption, console, emit, fail, print_renderable
from maas_tui.render import doctor as render_doctor
from maas_tui.render import telemetry as render


async def _frame_data(client: Any, since: str) -> tuple[list, list, Any]:
    workers, instances, history = await asyncio.gather(client.list_workers(), client.list_instances(),
                                                       client.telemetry(since=since))
    return workers, instances, history


def top(once: bool = typer.Option(False, "--once", help="print one frame and exit (scripts, tests)"),
        interval: float = typer.Option(2.0, "--interval", "-n", min=0.5, max=3600, help="seconds between frames"),
        since: str = typer.Option("15m", help="how much history the sparklines show: 300, 15m, 1h"),
        output: Format = OutputOption) -> None:
    """Live view of every worker's GPUs (utilisation and memory bars, history) and the instances'
    requests/s, tokens/s, latency and memory against their claim. Ctrl-C ends it."""
    from maas_tui.cli.main import call
    from maas_tui.client import MaasClient
    from maas_tui.config import load

    if once or output in (Format.json, Format.yaml):
        workers, instances, history = call(lambda c: _frame_data(c, since))
        if output in (Format.json, Format.yaml):
            emit(history, output)
            return
        print_renderable(render.top_frame(workers, instances, history, width=console.width, server=history.server))
        return
    from rich.live import Live

    call(lambda c: c.health())  # the server and credentials work before the screen is taken
    config = load()

    async def run() -> None:
        async with MaasClient(config.server, config.token) as client:
            with Live(console=console, screen=sys.stdout.isatty(), auto_refresh=False) as live:
                while True:
                    workers, instances, history = await _frame_data(client, since)
                    live.update(render.top_frame(workers, instances, history, width=console.width,
                                                 server=history.server), refresh=True)
                    await asyncio.sleep(interval)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def doctor(worker: Optional[str] = typer.Argument(None, help="the worker to check (default: every worker)"),
           all_workers: bool = typer.Option(False, "--all", help="every worker (the default without WORKER)"),
           bundle: Optional[Path] = typer.Option(None, "--bundle", help="also write a support archive (tar.gz)"),
           output: Format = OutputOption) -> None:
    """Check workers' environments: NVML and driver, Docker and its NVIDIA runtime, service and Ray ports
    against the kernel's ephemeral range, model cache disk, clock skew, the server and other workers
    reachable, Python and backend versions. Exit code 1 when a check fails."""
    from maas_tui.cli.main import call

    if worker and all_workers:
        fail("give a WORKER or --all, not both", code=2)
    reports = call(lambda c: c.doctor(worker))
    if output in (Format.json, Format.yaml):
        emit(reports, output)
    else:
        print_renderable(render_doctor.render(reports))
    if bundle is not None:
        path = write_bundle(bundle, reports)
        console.print(f"support bundle written to {path}")
    if any(render_doctor.worst(r) == "fail" for r in reports):
        raise typer.Exit(1)


def redact(value: Any) -> Any:
    """Tokens, passwords, secrets and keys out of a configuration document."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in k.lower() for w in ("token", "password", "secret", "key")) and v
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def write_bundle(path: Path, reports: list) -> Path:
    """versions, the redacted client configuration, doctor reports, workers, instances, recent events and
    the last lines of each instance's log (what an operator attaches to a support request)."""
    from importlib.metadata import PackageNotFoundError, version

    from maas_tui import config as client_config
    from maas_tui.cli.main import call

    try:
        client_version = version("maas-base")
    except PackageNotFoundError:
        client_version = "unknown"

    async def gather(client: Any) -> dict[str, Any]:
        health, workers, instances, events = await asyncio.gather(
            client.health(), client.list_workers(), client.list_instances(), client.list_events(limit=500))
        logs: dict[str, str] = {}
        for instance in instances[:20]:
            if not instance.worker_id:
                continue
            try:
                chunks = [c async for c in client.stream_logs(instance.name, tail=200)]
                logs[instance.name] = b"".join(chunks).decode("utf-8", "replace")
            except Exception as exc:  # its worker may be the reason for the bundle
                logs[instance.name] = f"(log not available: {exc})"
        return {"health": health, "workers": workers, "instances": instances, "events": events, "logs": logs}

    data = call(gather)
    config = client_config.load()
    files: dict[str, str] = {
        "versions.json": json.dumps({"client": client_version, "python": sys.version, "platform": platform.platform(),
                                     "server": data["health"]}, indent=2, default=str),
        "config.json": json.dumps(redact({"server": config.server, "token": config.token}), indent=2),
        "doctor.json": json.dumps([r.model_dump(mode="json") for r in reports], indent=2),
        "workers.json": json.dumps(redact([w.model_dump(mode="json") for w in data["workers"]]), indent=2),
        "instances.json": json.dumps(redact([i.model_dump(mode="json") for i in data["instances"]]), indent=2),
        "events.json": json.dumps([e.model_dump(mode="json") for e in data["events"]], indent=2),
    }
    files.update({f"logs/{name}.log": text for name, text in data["logs"].items()})
    path = path.with_name(path.name if path.name.endswith((".tar.gz", ".tgz")) else path.name + ".tar.gz")
    stamp = time.time()
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"maas-support/{name}")
            info.size, info.mtime, info.mode = len(raw), int(stamp), 0o600
            archive.addfile(info, io.BytesIO(raw))
    return path


def register(app: typer.Typer) -> None:
    app.command("top")(top)
    app.command("doctor")(doctor)
