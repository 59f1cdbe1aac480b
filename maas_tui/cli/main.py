"""`maas`: every command is a call on the API client plus output."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import typer

from maas_tui import config as client_config
from maas_tui.cli import ops_cmds
from maas_tui.cli.gateway_cmds import gateway_app
from maas_tui.cli.output import Format, OutputOption, age, console, emit, err_console, human_bytes, instance_state
from maas_tui.client import ApiClientError, MaasClient
from server import __version__, schemas

T = TypeVar("T")

app = typer.Typer(name="maas", help="MaaS-Base: deploy and serve models on your GPU machines.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)
model_app = typer.Typer(help="Deploy, list, scale and delete models.", no_args_is_help=True)
instance_app = typer.Typer(help="Model instances: list, describe, logs, delete.", no_args_is_help=True)
worker_app = typer.Typer(help="Workers (GPU hosts) in the cluster.", no_args_is_help=True)
key_app = typer.Typer(help="API keys for the OpenAI-compatible gateway.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(instance_app, name="instance")
app.add_typer(worker_app, name="worker")
app.add_typer(key_app, name="key")
app.add_typer(gateway_app, name="gateway")
ops_cmds.register(model_app, worker_app)
from maas_tui.cli.backend_cmds import backend_app  # noqa: E402
app.add_typer(backend_app, name="backend")
from maas_tui.cli import ssh_cmds  # noqa: E402
ssh_cmds.register(app)
from maas_tui.cli import context_cmds  # noqa: E402
context_cmds.register(app)
from maas_tui.cli.db_cmds import db_app  # noqa: E402
app.add_typer(db_app, name="db")
from maas_tui.cli import simulate_cmds  # noqa: E402
simulate_cmds.register(app)


def fail(message: str, code: int = 1) -> None:
    print_error(message)
    raise typer.Exit(code)


def call(work: Callable[[MaasClient], Awaitable[T]], server: str | None = None, token: str | None = None) -> T:
    """Run one piece of client work; API errors become a message and exit code 1."""
    config = client_config.load()
    url = server or config.server
    if not url:
        fail("no server configured: run 'maas login --server URL ...' or set MAAS_SERVER")

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
    port: Optional[int] = typer.Option(None, help="port for the API, the watch stream and /v1 [default: 8080]"),
    database_url: Optional[str] = typer.Option(None, help="external postgresql:// or sqlite:///PATH (default: embedded PostgreSQL)"),
    no_agent: bool = typer.Option(False, "--no-agent", help="do not run a local agent"),
    simulate_gpus: Optional[str] = typer.Option(None, help="give the local agent simulated GPUs, e.g. 4xH100-80GB"),
    higress_dir: Optional[Path] = typer.Option(None, help="keep Higress objects in this folder (Higress standalone layout)"),
    higress_kubeconfig: Optional[Path] = typer.Option(None, help="apply Higress objects through the Kubernetes API of this kubeconfig, or in-cluster for the pod's service account (namespace higress-system)"),
    advertise_url: Optional[str] = typer.Option(None, help="how Higress reaches this server, e.g. http://10.0.0.1:8080"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    ssh_port: Optional[int] = typer.Option(None, help="also serve the TUI over SSH on this port (public keys: maas user add-key)"),
    model_root: list[Path] = typer.Option([], "--model-root", help=(
        "a folder local model sources may lie in (repeatable; besides <data-dir>/models) [env: MAAS_MODEL_ROOTS]")),
) -> None:
    """Run the server (with an embedded PostgreSQL unless --database-url) and a local agent."""
    from maas_tui.cli.serve import run_start

    run_start(data_dir=data_dir, host=host, port=port, database_url=database_url, no_agent=no_agent,
              simulate_gpus=simulate_gpus, log_level=log_level, ssh_port=ssh_port,
              extra={"higress_dir": str(higress_dir.absolute()) if higress_dir else None,
                     "higress_kubeconfig": _kubeconfig_option(higress_kubeconfig),
                     "advertise_url": advertise_url,
                     "model_roots": os.pathsep.join(str(p.absolute()) for p in model_root) or None})


@app.command()
def agent(
    server_url: str = typer.Option(..., help="the server, e.g. http://10.0.0.1:8080"),
    token: str = typer.Option(..., envvar="MAAS_TOKEN", help="the cluster token (<data-dir>/token on the server)"),
    name: Optional[str] = typer.Option(None, help="worker name (default: host name)"),
    address: str = typer.Option("127.0.0.1", help="address the server and gateway use to reach this worker"),
    port: int = typer.Option(0, help="port of the agent's own endpoint (0: any free port)"),
    data_dir: Optional[Path] = typer.Option(None, help="where instance logs and state live"),
    simulate_gpus: Optional[str] = typer.Option(None, help="simulated GPUs, e.g. 4xH100-80GB,2xL4-24GB"),
    runtime: str = typer.Option("auto", help="auto, docker or process"),
    drain_seconds: float = typer.Option(5.0, min=0, help="how long a terminating instance keeps serving in-flight requests"),
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
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run an agent that joins this host to a cluster."""
    from maas_tui.cli.serve import run_agent

    run_agent(server_url=server_url, token=token, name=name, address=address, port=port, data_dir=data_dir,
              simulate_gpus=simulate_gpus, runtime=runtime, log_level=log_level, drain_seconds=drain_seconds,
              labels=labels, port_range=port_range, ray_port_range=ray_port_range, model_cache=model_cache,
              model_roots=[str(p.absolute()) for p in model_root])


@app.command()
def login(
    server: str = typer.Option(..., help="the server URL, e.g. http://127.0.0.1:8080"),
    username: Optional[str] = typer.Option(None, help="user name (default admin)"),
    password: Optional[str] = typer.Option(None, help="password (prompted when missing)"),
    api_key: Optional[str] = typer.Option(None, help="log in with an API key instead"),
) -> None:
    """Store the server URL and credentials for later commands."""
    server = server.rstrip("/")
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


# --- models ------------------------------------------------------------------------

MODEL_COLUMNS = [
    ("NAME", lambda m: m.name), ("BACKEND", lambda m: m.spec.backend),
    ("READY", lambda m: f"{m.ready_replicas}/{m.replicas}"), ("GEN", lambda m: m.generation),
    ("STATE", lambda m: m.state), ("AGE", lambda m: age(m.created_at)),
]
MODEL_WIDE = [("SOURCE", lambda m: m.spec.source), ("CONTEXT", lambda m: m.spec.context_length)]


def _resolve_source(source: str) -> str:
    """Local paths go to the server absolute; anything else (a repository id) as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() or source.startswith((".", "/", "~")) else source


@model_app.command("deploy")
def model_deploy(
    name: str = typer.Argument(..., help="the model name clients use in the 'model' field"),
    source: str = typer.Option(..., help=(
        "a local path on the worker, or a repository the agent downloads: hf://ORG/NAME or ORG/NAME "
        "(Hugging Face), ms://ORG/NAME (ModelScope), each optionally with @REVISION and /FILE; "
        "llama.cpp takes one .gguf, e.g. hf://ORG/NAME/FILE.gguf")),
    backend: str = typer.Option(..., help=f"one of: {', '.join(schemas.KNOWN_BACKENDS)}"),
    replicas: int = typer.Option(1, help="how many instances to run"),
    context_length: int = typer.Option(2048, help="context length each instance serves"),
    cpu_only: bool = typer.Option(False, "--cpu-only", help="serve from host RAM, never claim a GPU"),
    arg: list[str] = typer.Option([], "--arg", help="extra backend argument (repeatable)"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the backend (repeatable)"),
    wait: bool = typer.Option(False, "--wait", help="wait until every replica is running"),
    timeout: float = typer.Option(600, help="seconds --wait waits"),
    max_model_len: Optional[int] = typer.Option(None, help="vllm/sglang: longest sequence (default: the model's)"),
    concurrency: Optional[int] = typer.Option(None, help="vllm/sglang: full-length sequences the KV cache holds"),
    memory: Optional[str] = typer.Option(None, help="claim this much per replica instead of the estimate, e.g. 20GiB"),
    selector: list[str] = typer.Option([], "--selector", help="only workers with label KEY=VALUE (repeatable)"),
    gpu_type: Optional[str] = typer.Option(None, help="only GPUs whose name contains this, e.g. H100"),
    gpu_vendor: Optional[str] = typer.Option(None, help="only GPUs of this vendor, e.g. nvidia"),
    gpus: list[str] = typer.Option([], "--gpus", help="manual placement WORKER:0,1 (repeatable; several workers need --distributed)"),
    strategy: Optional[str] = typer.Option(None, help="spread (default) or binpack"),
    distributed: bool = typer.Option(False, "--distributed", help="vllm/sglang: may span workers when none fits alone"),
    partial_offload: bool = typer.Option(False, "--partial-offload", help="llama.cpp: layers that do not fit stay in RAM"),
    category: list[str] = typer.Option([], "--category", help=f"what the model serves (repeatable): {', '.join(schemas.MODEL_CATEGORIES)}; gates the /v1 endpoints [default: llm]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show where each replica would go (or why not); deploy nothing. Exit code 1 when some replica does not fit"),
    output: Format = OutputOption,
) -> None:
    """Deploy a model."""
    env_map = {}
    for item in env:
        if "=" not in item:
            fail(f"--env {item!r}: write KEY=VALUE", code=2)
        key, value = item.split("=", 1)
        env_map[key] = value
    body = {"name": name, "source": _resolve_source(source), "backend": backend, "replicas": replicas,
            "context_length": context_length, "cpu_only": cpu_only, "args": arg, "env": env_map}
    if category:
        body["categories"] = category
    body.update(_scheduling_fields(max_model_len, concurrency, memory, selector, gpu_type, gpu_vendor, gpus, strategy,
                                   distributed, partial_offload))
    if dry_run:
        evaluation = call(lambda c: c.evaluate_model(body))
        if output in (Format.json, Format.yaml):
            emit(evaluation, output)
        else:
            from maas_tui.cli.describe import print_evaluation

            print_evaluation(evaluation)
        if evaluation.schedulable < replicas:
            raise typer.Exit(1)
        return
    model = call(lambda c: c.create_model(body))
    if wait:
        model = _wait_ready(name, timeout, quiet=output in (Format.json, Format.yaml))
    emit(model, output, MODEL_COLUMNS, MODEL_WIDE)


def _scheduling_fields(max_model_len: int | None, concurrency: int | None, memory: str | None, selector: list[str],
                       gpu_type: str | None, gpu_vendor: str | None, gpus: list[str], strategy: str | None,
                       distributed: bool, partial_offload: bool) -> dict[str, Any]:
    """The deploy flags that shape scheduling, as spec fields (only those given)."""
    from server.schemas import parse_size

    fields: dict[str, Any] = {}
    if max_model_len is not None:
        fields["max_model_len"] = max_model_len
    if concurrency is not None:
        fields["concurrency"] = concurrency
    if memory is not None:
        size = parse_size(memory)
        if not size:
            fail(f"--memory {memory!r}: write a size such as 20GiB or 512MiB", code=2)
        fields["memory_bytes"] = size
    if selector:
        labels = {}
        for item in selector:
            if "=" not in item:
                fail(f"--selector {item!r}: write KEY=VALUE", code=2)
            key, value = item.split("=", 1)
            labels[key] = value
        fields["worker_selector"] = labels
    if gpus:
        selection = []
        for item in gpus:
            worker, _, indexes = item.rpartition(":")
            try:
                numbers = [int(i) for i in indexes.split(",") if i.strip()]
            except ValueError:
                numbers = []
            if not worker or not numbers:
                fail(f"--gpus {item!r}: write WORKER:INDEX[,INDEX...], e.g. gpu-1:0,1", code=2)
            selection.append({"worker": worker, "gpu_indexes": numbers})
        fields["gpu_selector"] = selection
    for key, value in (("gpu_type", gpu_type), ("gpu_vendor", gpu_vendor), ("placement_strategy", strategy)):
        if value is not None:
            fields[key] = value
    if distributed:
        fields["distributed"] = True
    if partial_offload:
        fields["partial_offload"] = True
    return fields


def _wait_ready(name: str, timeout: float, quiet: bool) -> schemas.ModelOut:
    async def work(client: MaasClient) -> schemas.ModelOut:
        deadline = time.monotonic() + timeout
        seen: dict[int, str] = {}
        while True:
            model = await client.get_model(name)
            instances = await client.list_instances(model=name)
            for instance in instances:
                line = f"{instance.state}" + (f": {instance.state_message}" if instance.state_message else "")
                if not quiet and seen.get(instance.id) != line:
                    err_console.print(f"  {instance.name}: {line}", highlight=False)
                seen[instance.id] = line
            running = sum(1 for i in instances if i.state == schemas.InstanceState.running)
            if running >= model.replicas and len(instances) == model.replicas:
                model.ready_replicas = running
                return model
            if time.monotonic() > deadline:
                raise ApiClientError(0, "timeout", f"{name}: {running}/{model.replicas} running after {timeout:g} s")
            await asyncio.sleep(0.25)

    return call(work)


@model_app.command("list")
def model_list(output: Format = OutputOption) -> None:
    """List models."""
    emit(call(lambda c: c.list_models()), output, MODEL_COLUMNS, MODEL_WIDE)


@model_app.command("get")
def model_get(name: str, output: Format = OutputOption) -> None:
    """Show one model."""
    emit(call(lambda c: c.get_model(name)), output, MODEL_COLUMNS, MODEL_WIDE)


@model_app.command("describe")
def model_describe(name: str, output: Format = OutputOption) -> None:
    """Show a model: its memory estimate, where each instance runs or why it waits, and recent events."""
    description = call(lambda c: c.describe_model(name))
    if output in (Format.json, Format.yaml):
        emit(description, output)
        return
    from maas_tui.cli.describe import print_model

    print_model(description)


@model_app.command("scale")
def model_scale(name: str, replicas: int = typer.Argument(..., min=0), wait: bool = typer.Option(False, "--wait"),
                timeout: float = typer.Option(600), output: Format = OutputOption) -> None:
    """Change a model's replica count."""
    model = call(lambda c: c.update_model(name, {"replicas": replicas}))
    if wait:
        model = _wait_ready(name, timeout, quiet=output in (Format.json, Format.yaml))
    emit(model, output, MODEL_COLUMNS, MODEL_WIDE)


@model_app.command("delete")
def model_delete(name: str, wait: bool = typer.Option(False, "--wait", help="wait until it is gone"),
                 timeout: float = typer.Option(120)) -> None:
    """Delete a model; its instances are stopped."""
    async def work(client: MaasClient) -> None:
        await client.delete_model(name)
        deadline = time.monotonic() + timeout
        while wait:
            try:
                await client.get_model(name)
            except ApiClientError as exc:
                if exc.status == 404:
                    return
                raise
            if time.monotonic() > deadline:
                raise ApiClientError(0, "timeout", f"{name} still exists after {timeout:g} s")
            await asyncio.sleep(0.25)

    call(work)
    console.print(f"model {name} deleted" if wait else f"model {name} is being deleted")


# --- instances ---------------------------------------------------------------------

INSTANCE_COLUMNS = [
    ("ID", lambda i: i.id), ("NAME", lambda i: i.name), ("MODEL", lambda i: i.model_name),
    ("STATE", instance_state), ("WORKER", lambda i: i.worker_name),
    ("ENDPOINT", lambda i: f"{i.address}:{i.port}" if i.port else ""), ("AGE", lambda i: age(i.created_at)),
]
INSTANCE_WIDE = [
    ("DEVICE", lambda i: (f"GPU {','.join(map(str, i.claim.gpu_indexes))}" if i.claim.device == "gpu" else "CPU") if i.claim else ""),
    ("CLAIM", lambda i: human_bytes((i.claim.vram_bytes_per_gpu or i.claim.ram_bytes)) if i.claim else ""),
    ("GEN", lambda i: i.generation), ("MESSAGE", lambda i: i.state_message.splitlines()[0] if i.state_message else ""),
]


@instance_app.command("list")
def instance_list(model: Optional[str] = typer.Option(None, help="only this model's instances"),
                  output: Format = OutputOption) -> None:
    """List model instances."""
    emit(call(lambda c: c.list_instances(model)), output, INSTANCE_COLUMNS, INSTANCE_WIDE)


@instance_app.command("get")
def instance_get(ref: str = typer.Argument(..., help="instance id or name"), output: Format = OutputOption) -> None:
    """Show one instance."""
    emit(call(lambda c: c.get_instance(ref)), output, INSTANCE_COLUMNS, INSTANCE_WIDE)


@instance_app.command("describe")
def instance_describe(ref: str = typer.Argument(..., help="instance id or name"), output: Format = OutputOption) -> None:
    """Show an instance: its placement and claim, why it waits if it does, and its events."""
    async def work(client: MaasClient) -> tuple[schemas.InstanceOut, list[schemas.EventOut]]:
        instance = await client.get_instance(ref)
        return instance, await client.list_events(limit=50, name=instance.name)

    instance, instance_events = call(work)
    if output in (Format.json, Format.yaml):
        emit({"instance": instance.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in instance_events]},
             output)
        return
    from maas_tui.cli.describe import print_instance

    print_instance(instance, instance_events)


@instance_app.command("delete")
def instance_delete(ref: str = typer.Argument(..., help="instance id or name")) -> None:
    """Stop an instance; the model controller starts a replacement."""
    instance = call(lambda c: c.delete_instance(ref))
    console.print(f"instance {instance.name} is terminating")


@instance_app.command("restart")
def instance_restart(ref: str = typer.Argument(..., help="instance id or name")) -> None:
    """Restart an instance's workload on its worker."""
    instance = call(lambda c: c.restart_instance(ref))
    console.print(f"instance {instance.name} is restarting (restart {instance.restart_count})")


@instance_app.command("logs")
def instance_logs(ref: str = typer.Argument(..., help="instance id or name"),
                  follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines"),
                  tail: int = typer.Option(200, help="lines from the end (-1: all)"),
                  previous: bool = typer.Option(False, "--previous", help="the log of the previous run")) -> None:
    """Print an instance's log."""
    async def work(client: MaasClient) -> None:
        async for chunk in client.stream_logs(ref, tail=tail, follow=follow, previous=previous):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    call(work)


# --- workers -------------------------------------------------------------------------

def _gpu_summary(worker: schemas.WorkerOut) -> str:
    if not worker.gpus:
        return "-"
    names: dict[str, int] = {}
    for gpu in worker.gpus:
        names[gpu.name] = names.get(gpu.name, 0) + 1
    return ", ".join(f"{count}x {name}" for name, count in names.items())


WORKER_COLUMNS = [
    ("NAME", lambda w: w.name), ("STATE", lambda w: w.state + (" (cordoned)" if w.cordoned else "")),
    ("ADDRESS", lambda w: w.address), ("GPUS", _gpu_summary),
    ("CPUS", lambda w: w.host.cpu_count), ("RAM", lambda w: human_bytes(w.host.memory_total)),
    ("AGE", lambda w: age(w.created_at)),
]
WORKER_WIDE = [("HEARTBEAT", lambda w: age(w.last_heartbeat_at)), ("LABELS", lambda w: ",".join(f"{k}={v}" for k, v in w.labels.items()))]


@worker_app.command("list")
def worker_list(output: Format = OutputOption) -> None:
    """List workers."""
    emit(call(lambda c: c.list_workers()), output, WORKER_COLUMNS, WORKER_WIDE)


@worker_app.command("get")
def worker_get(name: str, output: Format = OutputOption) -> None:
    """Show one worker."""
    emit(call(lambda c: c.get_worker(name)), output, WORKER_COLUMNS, WORKER_WIDE)


@worker_app.command("remove")
def worker_remove(name: str,
                  uninstall: Optional[str] = typer.Option(
                      None, "--uninstall", metavar="USER@HOST[:PORT]",
                      help="also stop and remove the agent that 'maas worker add' installed there"),
                  identity: Optional[Path] = typer.Option(None, help="SSH private key (with --uninstall)"),
                  remote_dir: str = typer.Option("~/.maas", help="where the agent lives there (with --uninstall)"),
                  no_host_key_check: bool = typer.Option(False, "--no-host-key-check")) -> None:
    """Remove a worker from the cluster; its instances are rescheduled."""
    if uninstall:
        from maas_tui.cli.ssh_cmds import worker_uninstall

        worker_uninstall(uninstall, identity=identity, port=22, remote_dir=remote_dir, remove=None,
                         no_host_key_check=no_host_key_check)
    call(lambda c: c.delete_worker(name))
    console.print(f"worker {name} removed")


# --- keys ----------------------------------------------------------------------------

KEY_COLUMNS = [("NAME", lambda k: k.name), ("PREFIX", lambda k: k.prefix), ("SCOPES", lambda k: ",".join(k.scopes)),
               ("MODELS", lambda k: ",".join(k.allowed_models) or "all"), ("CREATED", lambda k: age(k.created_at)),
               ("EXPIRES", lambda k: k.expires_at.date().isoformat() if k.expires_at else "never")]


@key_app.command("create")
def key_create(name: str, expires_in_days: Optional[int] = typer.Option(None, help="days until it stops working"),
               scope: list[str] = typer.Option([], "--scope", help="management and/or inference (default both; repeatable)"),
               allow_model: list[str] = typer.Option([], "--allow-model", help="only these models through /v1 (repeatable)"),
               output: Format = OutputOption) -> None:
    """Create an API key. The secret is shown once."""
    key = call(lambda c: c.create_key(name, expires_in_days, scope, allow_model))
    if output in (Format.json, Format.yaml):
        emit(key, output)
        return
    console.print(f"API key {key.name} created. Keep the secret now; it is not shown again:\n")
    print(key.key)


@key_app.command("list")
def key_list(output: Format = OutputOption) -> None:
    """List your API keys (never their secrets)."""
    emit(call(lambda c: c.list_keys()), output, KEY_COLUMNS)


@key_app.command("delete")
def key_delete(name: str) -> None:
    """Revoke an API key."""
    call(lambda c: c.delete_key(name))
    console.print(f"API key {name} revoked")


# --- events and chat -------------------------------------------------------------------

EVENT_COLUMNS = [("AGE", lambda e: age(e.created_at)), ("KIND", lambda e: e.kind), ("OBJECT", lambda e: e.object_name),
                 ("REASON", lambda e: e.reason), ("BY", lambda e: e.actor),
                 ("MESSAGE", lambda e: e.message.splitlines()[0] if e.message else "")]


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
    emit(call(lambda c: c.list_events(limit, name, kind)), output, EVENT_COLUMNS)


@app.command()
def usage(by: str = typer.Option("day,key,model", "--by", help="group by any of day, key, model (comma-separated)"),
          since: Optional[str] = typer.Option(None, help="first day, YYYY-MM-DD"),
          until: Optional[str] = typer.Option(None, help="last day, YYYY-MM-DD"),
          output: Format = OutputOption) -> None:
    """Gateway usage: requests and tokens per day, API key and model."""
    groups = [g for g in by.split(",") if g]
    columns = [(header, get) for group, header, get in (
        ("day", "DAY", lambda r: r.day), ("key", "KEY", lambda r: r.api_key), ("model", "MODEL", lambda r: r.model))
        if group in groups]
    columns += [("REQUESTS", lambda r: r.requests), ("PROMPT TOKENS", lambda r: r.prompt_tokens),
                ("COMPLETION TOKENS", lambda r: r.completion_tokens)]
    emit(call(lambda c: c.usage(by, since, until)), output, columns)


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
