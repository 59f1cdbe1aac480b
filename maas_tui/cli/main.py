"""`maas`: every command is a call on the API client plus output."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from pathlib import Path
from typing import Awaitable, Callable, Optional, TypeVar

import aiohttp
import typer

from maas_tui import config as client_config
from maas_tui.cli import ops_cmds
from maas_tui.cli.gateway_cmds import gateway_app
from maas_tui.cli.inputs import InputProblem, port_option, server_url, url_callback
from maas_tui.cli.output import Format, OutputOption, console, emit, err_console, fail, now, print_rows
from maas_tui.client import ApiClientError, MaasClient
from maas_tui.render import events as render_events
from server import __version__

T = TypeVar("T")

app = typer.Typer(name="maas", help="MaaS-Base: deploy and serve models on your GPU machines.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)
from maas_tui.cli.model_cmds import model_app  # noqa: E402
from maas_tui.cli.resource_cmds import instance_app, key_app, worker_app  # noqa: E402
app.add_typer(model_app, name="model")
app.add_typer(instance_app, name="instance")
app.add_typer(worker_app, name="worker")
app.add_typer(key_app, name="key")
app.add_typer(gateway_app, name="gateway")
ops_cmds.register(model_app, worker_app)
from maas_tui.cli.backend_cmds import backend_app  # noqa: E402
app.add_typer(backend_app, name="backend")
from maas_tui.cli.team_cmds import secret_app, team_app  # noqa: E402
app.add_typer(team_app, name="team")
app.add_typer(secret_app, name="secret")
from maas_tui.cli import audit_cmds  # noqa: E402
audit_cmds.register(app)
from maas_tui.cli import ssh_cmds  # noqa: E402
ssh_cmds.register(app)
from maas_tui.cli import context_cmds  # noqa: E402
context_cmds.register(app)
from maas_tui.cli.db_cmds import db_app  # noqa: E402
app.add_typer(db_app, name="db")
from maas_tui.cli import simulate_cmds  # noqa: E402
simulate_cmds.register(app)
from maas_tui.cli.file_cmds import file_app  # noqa: E402
app.add_typer(file_app, name="file")  # maas file list|pull|rm
from maas_tui.cli.route_cmds import route_app  # noqa: E402
app.add_typer(route_app, name="route")
from maas_tui.cli.limits_cmds import limits_app  # noqa: E402  (also maas model limits)
app.add_typer(limits_app, name="limits")  # maas limits list; keys: maas key create|update, teams: maas team limits
from maas_tui.cli import usage_cmds  # noqa: E402
usage_cmds.register(app)  # maas usage
from maas_tui.cli import alert_cmds, bench_cmds  # noqa: E402
alert_cmds.register(app)
bench_cmds.register(app)
from maas_tui.cli import top_cmds  # noqa: E402
top_cmds.register(app)


def call(work: Callable[[MaasClient], Awaitable[T]], server: str | None = None, token: str | None = None) -> T:
    """Run one piece of client work; API errors become a message and exit code 1."""
    config = client_config.load()
    url = server or config.server
    if not url:
        fail("no server configured: run 'maas login --server URL ...' or set MAAS_SERVER")
    try:
        url = server_url(url)
    except InputProblem as exc:
        fail(exc.message, exc.code)

    async def run() -> T:
        async with MaasClient(url, token if token is not None else config.token) as client:
            result = await work(client)
            if client.stale_seconds is not None:
                err_console.print(f"warning: the server's database is unavailable; this is what it answered "
                                  f"{client.stale_seconds} s ago", style="yellow")
            return result

    try:
        return asyncio.run(run())
    except ApiClientError as exc:
        hint = " (run 'maas login')" if exc.status == 401 else ""
        fail(f"{exc.message}{hint}")
    except aiohttp.InvalidURL as exc:
        fail(f"not a URL the client can use: {exc}", code=2)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


# --- server and agent -------------------------------------------------------------


def _kubeconfig_option(value: Path | None) -> str | None:
    if value is None or str(value) == "in-cluster":  # in-cluster: the pod's service account, not a file
        return None if value is None else "in-cluster"
    return str(value.absolute())


@app.command()
def start(
    data_dir: Optional[Path] = typer.Option(None, help="where the database, credentials and logs live"),
    host: Optional[str] = typer.Option(None, help="address to listen on [default: 127.0.0.1; 0.0.0.0 for remote agents]"),
    port: Optional[int] = port_option(None, "port for the API, the watch stream and /v1 [default: 8080]"),
    database_url: Optional[str] = typer.Option(None, help="external postgresql:// or sqlite:///PATH (default: embedded PostgreSQL)"),
    no_agent: bool = typer.Option(False, "--no-agent", help="do not run a local agent"),
    simulate_gpus: Optional[str] = typer.Option(None, help="give the local agent simulated GPUs, e.g. 4xH100-80GB"),
    higress_dir: Optional[Path] = typer.Option(None, help="keep Higress objects in this folder (Higress standalone layout)"),
    higress_kubeconfig: Optional[Path] = typer.Option(None, help="apply Higress objects through the Kubernetes API of this kubeconfig, or in-cluster for the pod's service account (namespace higress-system)"),
    advertise_url: Optional[str] = typer.Option(None, callback=url_callback,
                                                help="how Higress reaches this server, e.g. http://10.0.0.1:8080"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    ssh_port: Optional[int] = port_option(None, "also serve the TUI over SSH on this port (public keys: maas user add-key)"),
    ssh_max_sessions: int = typer.Option(16, min=1, max=1024, help="with --ssh-port: concurrent TUI sessions at most"),
    model_root: list[Path] = typer.Option([], "--model-root", help=(
        "a folder local model sources may lie in (repeatable; besides <data-dir>/models) [env: MAAS_MODEL_ROOTS]")),
) -> None:
    """Run the server (with an embedded PostgreSQL unless --database-url) and a local agent."""
    from maas_tui.cli.serve import run_start

    run_start(data_dir=data_dir, host=host, port=port, database_url=database_url, no_agent=no_agent,
              simulate_gpus=simulate_gpus, log_level=log_level, ssh_port=ssh_port, ssh_max_sessions=ssh_max_sessions,
              extra={"higress_dir": str(higress_dir.absolute()) if higress_dir else None,
                     "higress_kubeconfig": _kubeconfig_option(higress_kubeconfig),
                     "advertise_url": advertise_url,
                     "model_roots": os.pathsep.join(str(p.absolute()) for p in model_root) or None})


@app.command()
def agent(
    server_url: str = typer.Option(..., callback=url_callback, help="the server, e.g. http://10.0.0.1:8080"),
    token: str = typer.Option(..., envvar="MAAS_TOKEN", help="the cluster token (<data-dir>/token on the server)"),
    name: Optional[str] = typer.Option(None, help="worker name (default: host name)"),
    address: str = typer.Option("127.0.0.1", help="address the server and gateway use to reach this worker"),
    port: int = port_option(0, "port of the agent's own endpoint (0: any free port)", allow_zero=True),
    data_dir: Optional[Path] = typer.Option(None, help="where instance logs and state live"),
    simulate_gpus: Optional[str] = typer.Option(None, help="simulated GPUs, e.g. 4xH100-80GB,2xL4-24GB"),
    runtime: str = typer.Option("auto", help=(
        "auto (per instance: Docker when the backend's image for this host is on the engine or pullable, "
        "else a process where the backend runs natively), docker or process")),
    drain_seconds: float = typer.Option(5.0, min=0, help=(
        "how long a terminating instance keeps serving at least (every gateway stops routing to it meanwhile)")),
    drain_max_seconds: float = typer.Option(120.0, min=0, help=(
        "after that, until its backend reports no request in flight, at most this long in all")),
    labels: list[str] = typer.Option([], "--labels", help="worker labels k=v[,k=v] (repeatable), for worker_selector"),
    port_range: str = typer.Option("20000-29999", envvar="MAAS_AGENT_PORT_RANGE",
                                   help="ports for the workloads, LOW-HIGH, outside the kernel's ephemeral range"),
    ray_port_range: str = typer.Option("30000-32767", envvar="MAAS_AGENT_RAY_PORT_RANGE", help=(
        "ports for Ray nodes of multi-host placements, LOW-HIGH, 40 per node, apart from --port-range "
        "and outside the kernel's ephemeral range")),
    model_cache: Optional[Path] = typer.Option(None, envvar="MAAS_MODEL_CACHE", help=(
        "where Hugging Face and ModelScope downloads are kept (default: <data-dir>/models)")),
    model_root: list[Path] = typer.Option([], "--model-root", help=(
        "a folder local model sources may lie in (repeatable; besides the model cache) [env: MAAS_MODEL_ROOTS]")),
    cache_limit: Optional[str] = typer.Option(None, envvar="MAAS_CACHE_LIMIT", help=(
        "the model cache's size limit, e.g. 50G: least recently used files no instance uses are evicted")),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run an agent that joins this host to a cluster."""
    from maas_tui.cli.serve import run_agent

    run_agent(server_url=server_url, token=token, name=name, address=address, port=port, data_dir=data_dir,
              simulate_gpus=simulate_gpus, runtime=runtime, log_level=log_level, drain_seconds=drain_seconds,
              drain_max_seconds=drain_max_seconds, labels=labels, port_range=port_range,
              ray_port_range=ray_port_range, model_cache=model_cache,
              model_roots=[str(p.absolute()) for p in model_root], cache_limit=cache_limit)


@app.command()
def login(
    server: str = typer.Option(..., help="the server URL, e.g. http://127.0.0.1:8080"),
    username: Optional[str] = typer.Option(None, help="user name (default admin)"),
    password: Optional[str] = typer.Option(None, help="password (prompted when missing)"),
    api_key: Optional[str] = typer.Option(None, help="log in with an API key instead"),
) -> None:
    """Store the server URL and credentials for later commands."""
    try:
        server = server_url(server)
    except InputProblem as exc:
        fail(exc.message, exc.code)
    if api_key:
        call(lambda c: c.list_models(), server=server, token=api_key)
        token = api_key
    else:
        user = username or "admin"
        secret = password if password is not None else getpass.getpass(f"password for {user}: ")
        token = call(lambda c: c.login(user, secret), server=server, token="").token
    path = client_config.save(client_config.ClientConfig(server=server, token=token))
    console.print(f"logged in to {server} (credentials in {path})")


@app.command()
def version() -> None:
    """Print the client version, and the server's when one is configured."""
    console.print(f"client: maas {__version__}")
    if client_config.load().server:
        console.print(f"server: maas {call(lambda c: c.health())['version']}")


# --- events and chat -------------------------------------------------------------------

_EVENT_KINDS = {"model": "models", "instance": "instances", "worker": "workers", "key": "api_keys"}


@app.command()
def events(limit: int = typer.Option(50, min=1, max=1000),
           name: Optional[str] = typer.Option(None, "--for", help="only this object: NAME or KIND/NAME (model/tiny)"),
           output: Format = OutputOption) -> None:
    """Recent cluster events, newest last."""
    kind = None
    if name and "/" in name:
        prefix, name = name.split("/", 1)
        if prefix not in _EVENT_KINDS:
            fail(f"--for {prefix}/...: the kind is one of {', '.join(_EVENT_KINDS)}", code=2)
        kind = _EVENT_KINDS[prefix]
    found = call(lambda c: c.list_events(limit, name, kind))
    if output in (Format.json, Format.yaml):
        emit(found, output)
        return
    print_rows(render_events.COLUMNS, render_events.WIDE_COLUMNS, render_events.rows(found, now(), truncate=False),
               output == Format.wide)


@app.command()
def chat(model: str, prompt: str, max_tokens: int = typer.Option(64, min=1, max=8192)) -> None:
    """Send one prompt through the gateway and stream the answer."""
    async def work(client: MaasClient) -> None:
        async for piece in client.chat(model, prompt, max_tokens):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    call(work)


@app.command()
def tui() -> None:
    """The terminal UI: live GPU heatmap, models, instances, logs and events."""
    from maas_tui.tui.app import run_tui

    config = client_config.load()
    if not config.server:
        fail("no server configured: run 'maas login --server URL ...' or set MAAS_SERVER")
    # The SSH front door sets MAAS_TUI_REMOTE: this process runs on the server, so nothing may be saved here.
    run_tui(config.server, config.token, remote=os.environ.get("MAAS_TUI_REMOTE") == "1")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
