"""`maas simulate`: a whole fake cluster in one process (agent/simulate.py)."""

from __future__ import annotations

from typing import Optional

import typer


def simulate(
    workers: int = typer.Option(10, min=1, max=100_000, help="how many simulated workers"),
    gpus: str = typer.Option("8xH100-80GB", help="simulated GPUs of each worker, e.g. 8xH100-80GB or 4xL4-24GB,2xA100-80GB"),
    server: str = typer.Option(..., "--server", help="the server, e.g. http://127.0.0.1:8080"),
    token: str = typer.Option(..., envvar="MAAS_TOKEN", help="the cluster token (<data-dir>/token on the server)"),
    kill_rate: float = typer.Option(0.0, min=0, help="simulated workers stopped per minute (their heartbeats and watch end)"),
    flap: bool = typer.Option(False, "--flap", help="stopped workers come back after --flap-down seconds"),
    flap_down: float = typer.Option(30.0, min=0, help="how long a flapping worker stays silent"),
    heartbeat_interval: float = typer.Option(5.0, min=0.1, help="seconds between heartbeats of each worker"),
    name_prefix: str = typer.Option("sim", help="workers are named PREFIX-00000, PREFIX-00001, ..."),
    register_rate: float = typer.Option(50.0, min=1, help="registrations started per second"),
    duration: Optional[float] = typer.Option(None, min=1, help="stop after this many seconds (default: until Ctrl-C)"),
    report_every: float = typer.Option(10.0, min=0.5, help="seconds between status lines"),
    summary: Optional[str] = typer.Option(None, help="write a JSON summary (with every heartbeat's latency) here at the end"),
) -> None:
    """Run N fake agents against a real server: they register, watch, heartbeat with moving GPU
    utilisation and run what is placed on them at once (no backend process). Every worker is labelled
    maas.simulated=true and every GPU simulated. For demos, capacity planning and scale tests."""
    from agent.devices import DeviceSpecError, parse_simulated
    from agent.simulate import SimulateConfig, run, run_loop

    try:
        parse_simulated(gpus)
    except DeviceSpecError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    config = SimulateConfig(server_url=server.rstrip("/"), token=token, workers=workers, gpus=gpus,
                            heartbeat_interval=heartbeat_interval, kill_rate=kill_rate, flap=flap, flap_down=flap_down,
                            name_prefix=name_prefix, register_rate=register_rate)
    typer.echo(f"simulating {workers} workers with {gpus} (simulated) against {config.server_url}; Ctrl-C stops")
    try:
        result = run_loop(run(config, duration=duration, report_every=report_every, summary_path=summary,
                              echo=lambda line: typer.echo(line)))
    except KeyboardInterrupt:
        return
    typer.echo(f"done: {result['registered']} registered, {result['heartbeats']} heartbeats "
               f"(p50 {result['hb_p50_ms']} ms, p99 {result['hb_p99_ms']} ms), busy {result['busy']}, "
               f"errors {result['errors']} {result['error_kinds'] or ''}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
