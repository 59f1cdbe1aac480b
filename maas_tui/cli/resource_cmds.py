"""`maas instance|worker|key ...`: list, get (-o yaml|json: a kubectl-style document), describe, and the
actions on each. Tables and describe pages come from maas_tui/render/<kind>.py, as in the TUI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from maas_tui.cli import limits_cmds
from maas_tui.cli.output import Format, OutputOption, console, emit, emit_document, fail, now, print_renderable, \
    print_rows
from maas_tui.client import MaasClient
from maas_tui.render import instances, keys, workers
from maas_tui.tui.state import ClusterState
from server import schemas

instance_app = typer.Typer(help="Model instances: list, describe, logs, delete.", no_args_is_help=True)
worker_app = typer.Typer(help="Workers (GPU hosts) in the cluster.", no_args_is_help=True)
key_app = typer.Typer(help="API keys for the OpenAI-compatible gateway.", no_args_is_help=True)


def call(work: Any, **kwargs: Any) -> Any:
    from maas_tui.cli.main import call as run  # main imports this module

    return run(work, **kwargs)


# --- instances ---------------------------------------------------------------------


@instance_app.command("list")
def instance_list(model: Optional[str] = typer.Option(None, help="only this model's instances"),
                  output: Format = OutputOption) -> None:
    """List model instances (-o json|yaml: the objects as the API gives them, under "items")."""
    _show_instances(call(lambda c: c.list_instances(model)), output)


@instance_app.command("get")
def instance_get(ref: str = typer.Argument(..., help="instance id or name"), output: Format = OutputOption) -> None:
    """Show one instance; -o yaml|json prints a document (kind, metadata, spec, status)."""
    instance = call(lambda c: c.get_instance(ref))
    if output in (Format.json, Format.yaml):
        emit_document(instances.document_of(instance), output)
        return
    _show_instances([instance], output)


def _show_instances(items: list[schemas.InstanceOut], output: Format) -> None:
    if output in (Format.json, Format.yaml):
        emit(items, output)
        return
    state = ClusterState().load(instances=items)
    print_rows(instances.COLUMNS, instances.WIDE_COLUMNS, instances.rows(state, now()), output == Format.wide)


@instance_app.command("describe")
def instance_describe(ref: str = typer.Argument(..., help="instance id or name"), output: Format = OutputOption) -> None:
    """Show an instance: its placement and claim, why it waits if it does, and its events."""
    async def work(client: MaasClient) -> tuple[schemas.InstanceOut, list[schemas.EventOut], Any]:
        instance = await client.get_instance(ref)
        history = await client.telemetry(instance=str(instance.id), since="15m")  # claimed vs actual, traffic
        return (instance, await client.list_events(limit=50, name=instance.name),
                history.instances[0] if history.instances else None)

    instance, instance_events, activity = call(work)
    if output in (Format.json, Format.yaml):
        emit({"instance": instance.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in instance_events],
              "memory": activity.memory.model_dump(mode="json") if activity and activity.memory else None}, output)
        return
    print_renderable(instances.describe(instance, events=list(reversed(instance_events)), now=now(),
                                        activity=activity))


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


# --- workers -----------------------------------------------------------------------


@worker_app.command("list")
def worker_list(output: Format = OutputOption) -> None:
    """List workers (-o json|yaml: the objects as the API gives them, under "items")."""
    async def work(client: MaasClient) -> tuple[list[schemas.WorkerOut], list[schemas.InstanceOut]]:
        return await client.list_workers(), await client.list_instances()

    _show_workers(*call(work), output)


@worker_app.command("get")
def worker_get(name: str, output: Format = OutputOption) -> None:
    """Show one worker; -o yaml|json prints a document (kind, metadata, spec, status)."""
    async def work(client: MaasClient) -> tuple[schemas.WorkerOut, list[schemas.InstanceOut]]:
        return await client.get_worker(name), await client.list_instances()

    worker, all_instances = call(work)
    if output in (Format.json, Format.yaml):
        emit_document(workers.document_of(worker), output)
        return
    _show_workers([worker], all_instances, output)


def _show_workers(items: list[schemas.WorkerOut], all_instances: list[schemas.InstanceOut], output: Format) -> None:
    if output in (Format.json, Format.yaml):
        emit(items, output)
        return
    state = ClusterState().load(workers=items, instances=all_instances)
    wide = output == Format.wide
    print_rows(workers.COLUMNS, workers.WIDE_COLUMNS, workers.rows(state, now(), wide=wide), wide)


@worker_app.command("describe")
def worker_describe(name: str, output: Format = OutputOption) -> None:
    """Show a worker: host, GPUs with their claims, the instances on it, its events."""
    async def work(client: MaasClient) -> tuple[schemas.WorkerOut, list[schemas.InstanceOut], list[schemas.EventOut]]:
        worker = await client.get_worker(name)
        return worker, await client.list_instances(), await client.list_events(limit=50, name=worker.name)

    worker, all_instances, worker_events = call(work)
    if output in (Format.json, Format.yaml):
        emit({"worker": worker.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in worker_events]},
             output)
        return
    state = ClusterState().load(workers=[worker], instances=all_instances)
    print_renderable(workers.describe(worker, state=state, events=list(reversed(worker_events)), now=now(),
                                      width=console.width))


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


# --- keys --------------------------------------------------------------------------


@key_app.command("create")
def key_create(name: str, expires_in_days: Optional[int] = typer.Option(None, help="days until it stops working"),
               scope: list[str] = typer.Option([], "--scope", help="management and/or inference (default inference; repeatable)"),
               allow_model: list[str] = typer.Option([], "--allow-model", help="only these models through /v1 (repeatable)"),
               rpm: Optional[str] = limits_cmds.RPM, tpm: Optional[str] = limits_cmds.TPM,
               max_concurrency: Optional[str] = limits_cmds.MAX_CONCURRENCY,
               budget_day: Optional[str] = limits_cmds.BUDGET_DAY, budget_month: Optional[str] = limits_cmds.BUDGET_MONTH,
               output: Format = OutputOption) -> None:
    """Create an API key, with gateway limits if given. The secret is shown once."""
    given = limits_cmds.changes(rpm, tpm, max_concurrency, budget_day, budget_month)  # checked before anything is made

    async def create(c: MaasClient) -> schemas.ApiKeyCreated:
        created = await c.create_key(name, expires_in_days, scope, allow_model)
        if given:
            await c.set_limits("key", name, given)
        return created
    key = call(create)
    if output in (Format.json, Format.yaml):
        emit(key, output)
        return
    console.print(f"API key {key.name} created. Keep the secret now; it is not shown again:\n")
    print(key.key)


@key_app.command("update")
def key_update(name: str, user: Optional[str] = typer.Option(None, "--user", help="another user's key (admin)"),
               rpm: Optional[str] = limits_cmds.RPM, tpm: Optional[str] = limits_cmds.TPM,
               max_concurrency: Optional[str] = limits_cmds.MAX_CONCURRENCY,
               budget_day: Optional[str] = limits_cmds.BUDGET_DAY, budget_month: Optional[str] = limits_cmds.BUDGET_MONTH,
               output: Format = OutputOption) -> None:
    """Set an API key's gateway limits (limits not given stay as they are; 'none' removes one). Your keys'
    limits narrow your own use; your team's and the model's limits hold as well."""
    given = limits_cmds.changes(rpm, tpm, max_concurrency, budget_day, budget_month)
    if not given:
        fail("give at least one of --rpm, --tpm, --max-concurrency, --budget-day, --budget-month", code=2)
    limits_cmds.show(call(lambda c: c.set_limits("key", name, given, user)), output)


async def _keys_and_limits(c: MaasClient, all_users: bool) -> tuple[list[schemas.ApiKeyListed], dict[int, Any]]:
    listed = await c.list_keys(all_users)
    return listed, {item.api_key_id: item for item in await c.list_limits("key")}


@key_app.command("list")
def key_list(all_users: bool = typer.Option(False, "--all", help="every user's keys, with their owner (admin)"),
             output: Format = OutputOption) -> None:
    """List your API keys (never their secrets), with their gateway limits."""
    if output in (Format.json, Format.yaml):
        emit(call(lambda c: c.list_keys(all_users)), output)
        return
    items, limits = call(lambda c: _keys_and_limits(c, all_users))
    columns = keys.COLUMNS + [keys.LIMITS_COLUMN]
    if not all_users:
        print_rows(columns, keys.WIDE_COLUMNS, keys.rows(items, now(), limits), output == Format.wide)
        return
    for owner in sorted({k.owner for k in items}):  # one table per owner: names repeat across users
        console.print(f"{owner}:")
        print_rows(columns, keys.WIDE_COLUMNS, keys.rows([k for k in items if k.owner == owner], now(), limits),
                   output == Format.wide)


def _key(name: str) -> schemas.ApiKeyOut:
    found = next((k for k in call(lambda c: c.list_keys()) if k.name == name), None)
    if found is None:
        fail(f"API key {name!r} not found")
    return found


@key_app.command("get")
def key_get(name: str, output: Format = OutputOption) -> None:
    """Show one API key (never its secret); -o yaml|json prints a document (kind, metadata, spec, status)."""
    key = _key(name)
    if output in (Format.json, Format.yaml):
        emit_document(keys.document_of(key), output)
        return
    print_rows(keys.COLUMNS, keys.WIDE_COLUMNS, keys.rows([key], now()), output == Format.wide)


@key_app.command("describe")
def key_describe(name: str, output: Format = OutputOption) -> None:
    """Show an API key: scopes, models, expiry, last use, gateway limits (never its secret)."""
    key = _key(name)
    if output in (Format.json, Format.yaml):
        emit(key, output)
        return
    limits = next((item for item in call(lambda c: c.list_limits("key")) if item.api_key_id == key.id), None)
    print_renderable(keys.describe(key, now=now(), limits=limits))


@key_app.command("delete")
def key_delete(name: str, user: Optional[str] = typer.Option(None, "--user", help="another user's key (admin)")) -> None:
    """Revoke an API key."""
    call(lambda c: c.delete_key(name, user))
    console.print(f"API key {name} revoked")
