"""`maas model ...`: deploy, list, get, describe, scale, autoscale, delete (rollouts and history: ops_cmds.py).

Tables and describe pages come from maas_tui/render/models.py, as in the TUI's Models view.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Optional

import typer

from maas_tui.cli.describe import print_evaluation
from maas_tui.cli.output import Format, OutputOption, console, emit, emit_document, err_console, fail, now, \
    print_renderable, print_rows
from maas_tui.client import ApiClientError, MaasClient
from maas_tui.render import models as render
from maas_tui.tui.state import ClusterState
from server import schemas
from server.schemas.rollout import rollout_status

model_app = typer.Typer(help="Deploy, list, scale and delete models.", no_args_is_help=True)


def call(work: Any, **kwargs: Any) -> Any:
    from maas_tui.cli.main import call as run  # main imports this module

    return run(work, **kwargs)


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
    env_secret: list[str] = typer.Option([], "--env-secret", help="KEY=SECRET: the team secret SECRET as KEY (repeatable)"),
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
    team: Optional[str] = typer.Option(None, help="the owning team (default: your only team; default for admins and operators)"),
    min_replicas: Optional[int] = typer.Option(None, min=0, help="autoscaling: fewest replicas (0: scale to zero when idle); needs --max-replicas"),
    max_replicas: Optional[int] = typer.Option(None, min=1, help="autoscaling: most replicas (turns autoscaling on)"),
    target_concurrency: Optional[int] = typer.Option(None, min=1, help="autoscaling: requests in flight per replica aimed at [default: 8]"),
    scale_down_delay: Optional[float] = typer.Option(None, min=0, help="autoscaling: seconds the load stays low before replicas go [default: 60]"),
    idle_timeout: Optional[float] = typer.Option(None, min=1, help="with --min-replicas 0: seconds without a request before zero replicas [default: 900]"),
    cold_start_timeout: Optional[float] = typer.Option(None, min=1, help="seconds a request is held while a replica starts, then 503 [default: 120]"),
    priority: Optional[str] = typer.Option(None, help="priority class (default classes: critical, high, normal, low); may preempt lower ones [default: normal]"),
    output: Format = OutputOption,
) -> None:
    """Deploy a model."""
    env_map = {}
    for item in env:
        if "=" not in item:
            fail(f"--env {item!r}: write KEY=VALUE", code=2)
        key, value = item.split("=", 1)
        env_map[key] = value
    for item in env_secret:
        if "=" not in item:
            fail(f"--env-secret {item!r}: write KEY=SECRET", code=2)
        key, secret = item.split("=", 1)
        env_map[key] = {"secret": secret}
    body = {"name": name, "source": _resolve_source(source), "backend": backend, "replicas": replicas,
            "context_length": context_length, "cpu_only": cpu_only, "args": arg, "env": env_map}
    if category:
        body["categories"] = category
    if team:
        body["team"] = team
    body.update(_scheduling_fields(max_model_len, concurrency, memory, selector, gpu_type, gpu_vendor, gpus, strategy,
                                   distributed, partial_offload))
    body.update(_scaling_fields(min_replicas, max_replicas, target_concurrency, scale_down_delay, idle_timeout,
                                cold_start_timeout, priority))
    if dry_run:
        evaluation = call(lambda c: c.evaluate_model(body))
        if output in (Format.json, Format.yaml):
            emit(evaluation, output)
        else:
            print_evaluation(evaluation)
        if evaluation.schedulable < replicas:
            raise typer.Exit(1)
        return
    model = call(lambda c: c.create_model(body))
    if wait:
        model = _wait_ready(name, timeout, quiet=output in (Format.json, Format.yaml))
    _show_one(model, output)


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
    """List models (-o json|yaml: the objects as the API gives them, under "items")."""
    async def work(client: MaasClient) -> tuple[list[schemas.ModelOut], list[schemas.InstanceOut]]:
        return await client.list_models(), await client.list_instances()

    models, instances = call(work)
    show_models(models, output, instances)


@model_app.command("get")
def model_get(name: str, output: Format = OutputOption) -> None:
    """Show one model; -o yaml|json prints the document `maas apply -f` takes back (kind, metadata, spec, status)."""
    async def work(client: MaasClient) -> tuple[schemas.ModelOut, list[schemas.InstanceOut]]:
        return await client.get_model(name), await client.list_instances(model=name)

    model, instances = call(work)
    if output in (Format.json, Format.yaml):
        emit_document(render.document_of(model), output)
        return
    show_models([model], output, instances)


@model_app.command("describe")
def model_describe(name: str, output: Format = OutputOption) -> None:
    """Show a model: its memory estimate, where each instance runs or why it waits, and recent events."""
    description = call(lambda c: c.describe_model(name))
    if output in (Format.json, Format.yaml):
        emit(description, output)
        return
    model = description.model
    print_renderable(render.describe(
        model, instances=description.instances, events=list(reversed(description.events)),
        rollout=rollout_status(model, description.instances), now=now(), estimate=description.estimate,
        estimate_error=description.estimate_error))
    from rich.console import Group
    from rich.text import Text

    from maas_tui.render.telemetry import model_activity

    activity = call(lambda c: c.telemetry(model=name, since="15m"))  # this server's traffic and memory history
    print_renderable(Group(Text(""), model_activity(activity)))


def show_models(models: list[schemas.ModelOut], output: Format, instances: list[schemas.InstanceOut] = ()) -> None:
    """Models as the TUI's Models view shows them (table, wide), or the API objects (json, yaml)."""
    if output in (Format.json, Format.yaml):
        emit(models, output)
        return
    state = ClusterState().load(models=models, instances=list(instances))
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(state, now()), output == Format.wide)


@model_app.command("scale")
def model_scale(name: str, replicas: int = typer.Argument(..., min=0), wait: bool = typer.Option(False, "--wait"),
                timeout: float = typer.Option(600), output: Format = OutputOption) -> None:
    """Change a model's replica count (on an autoscaled model: back to the manual mode)."""
    async def work(client: MaasClient) -> tuple[bool, schemas.ModelOut]:
        was_autoscaled = (await client.get_model(name)).max_replicas is not None
        return was_autoscaled, await client.update_model(name, {"replicas": replicas})

    was_autoscaled, model = call(work)
    if was_autoscaled:
        err_console.print(f"autoscaling of {name} is off now ('maas model autoscale {name} --max N' turns it on again)")
    if wait:
        model = _wait_ready(name, timeout, quiet=output in (Format.json, Format.yaml))
    _show_one(model, output)


def _scaling_fields(min_replicas: int | None, max_replicas: int | None, target_concurrency: int | None,
                    scale_down_delay: float | None, idle_timeout: float | None, cold_start_timeout: float | None,
                    priority: str | None) -> dict[str, Any]:
    """The autoscaling and priority flags, as model fields (only those given)."""
    given = {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_concurrency": target_concurrency,
             "scale_down_delay": scale_down_delay, "idle_timeout": idle_timeout,
             "cold_start_timeout": cold_start_timeout, "priority": priority}
    return {k: v for k, v in given.items() if v is not None}


@model_app.command("autoscale")
def model_autoscale(
    name: str,
    min_replicas: Optional[int] = typer.Option(None, "--min", min=0, help="fewest replicas (0: scale to zero when idle) [default: 1, or as before]"),
    max_replicas: Optional[int] = typer.Option(None, "--max", min=1, help="most replicas (turns autoscaling on)"),
    target_concurrency: Optional[int] = typer.Option(None, "--target-concurrency", min=1, help="requests in flight per replica aimed at"),
    scale_down_delay: Optional[float] = typer.Option(None, "--scale-down-delay", min=0, help="seconds the load stays low before replicas go"),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", min=1, help="with --min 0: seconds without a request before zero replicas"),
    cold_start_timeout: Optional[float] = typer.Option(None, "--cold-start-timeout", min=1, help="seconds a request is held while a replica starts"),
    priority: Optional[str] = typer.Option(None, "--priority", help="priority class"),
    off: bool = typer.Option(False, "--off", help="back to the manual mode, keeping the replicas running now"),
    output: Format = OutputOption,
) -> None:
    """Autoscale a model on its load: e.g. --min 0 --max 4 --target-concurrency 8 (or --off)."""
    changes = _scaling_fields(min_replicas, max_replicas, target_concurrency, scale_down_delay, idle_timeout,
                              cold_start_timeout, priority)
    if off and (min_replicas is not None or max_replicas is not None):
        fail("--off turns autoscaling off: give it without --min and --max", code=2)

    async def work(client: MaasClient) -> schemas.ModelOut:
        if off:  # setting replicas (to what runs now) is the manual mode
            changes["replicas"] = (await client.get_model(name)).replicas
        return await client.update_model(name, changes)

    if not changes and not off:
        fail("nothing to change: give --max (and --min, --target-concurrency, ...) or --off", code=2)
    model = call(work)
    if output in (Format.json, Format.yaml):
        emit(model, output)
        return
    console.print(render.scaling_text(model, now()))


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



def _show_one(model: schemas.ModelOut, output: Format) -> None:
    """What deploy and scale print: the model as the API answered (json, yaml), or its row with its instances."""
    if output in (Format.json, Format.yaml):
        emit(model, output)
        return
    show_models([model], output, call(lambda c: c.list_instances(model=model.name)))
