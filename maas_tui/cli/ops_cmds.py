"""Operator commands: `maas model rollout ...`, `maas model history`, `maas worker cordon|uncordon|drain|approve`."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, age, console, emit, err_console
from maas_tui.client import ApiClientError, MaasClient

rollout_app = typer.Typer(help="Rollouts: status, restart, undo, pause, resume.", no_args_is_help=True)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width if total == 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _show(status) -> str:
    state = "complete" if status.complete else ("paused" if status.paused else "in progress")
    line = (f"{status.model} generation {status.generation}: {_bar(status.ready, status.replicas)} "
            f"updated {status.updated}/{status.replicas}, ready {status.ready}/{status.replicas}, "
            f"available {status.available}, outdated {status.outdated} ({state})")
    return line + (f"\n  {status.message}" if status.message else "")


async def _wait_complete(client: MaasClient, name: str, timeout: float, quiet: bool) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = await client.rollout_status(name)
        line = _show(status)
        if line != last and not quiet:
            err_console.print(line, highlight=False)
        last = line
        if status.complete:
            return
        if time.monotonic() > deadline:
            raise ApiClientError(0, "timeout", f"rollout of {name} not complete after {timeout:g} s")
        await asyncio.sleep(0.25)


@rollout_app.command("status")
def rollout_status(name: str, wait: bool = typer.Option(False, "--wait", help="follow until the rollout completes"),
                   timeout: float = typer.Option(600), output: Format = OutputOption) -> None:
    """Where a model's rollout stands (updated / ready / desired)."""
    from maas_tui.cli.main import call

    async def work(client: MaasClient):
        if wait:
            await _wait_complete(client, name, timeout, quiet=output in (Format.json, Format.yaml))
        return await client.rollout_status(name)

    status = call(work)
    if output in (Format.json, Format.yaml):
        emit(status, output)
    else:
        console.print(_show(status), highlight=False)


def _action(name: str, action: str, wait: bool, timeout: float, to_revision: int | None = None) -> None:
    from maas_tui.cli.main import call

    async def work(client: MaasClient):
        model = await client.rollout_action(name, action, to_revision)
        if wait:
            await _wait_complete(client, name, timeout, quiet=False)
        return model

    model = call(work)
    console.print(f"{name}: {action} done (generation {model.generation})", highlight=False)


@rollout_app.command("restart")
def rollout_restart(name: str, wait: bool = typer.Option(False, "--wait"), timeout: float = typer.Option(600)) -> None:
    """Replace every instance with a fresh one, a few at a time."""
    _action(name, "restart", wait, timeout)


@rollout_app.command("undo")
def rollout_undo(name: str, to_revision: Optional[int] = typer.Option(None, "--to-revision", min=1),
                 wait: bool = typer.Option(False, "--wait"), timeout: float = typer.Option(600)) -> None:
    """Go back to the previous spec (or a given revision)."""
    _action(name, "undo", wait, timeout, to_revision)


@rollout_app.command("pause")
def rollout_pause(name: str) -> None:
    """Freeze a rollout where it stands."""
    _action(name, "pause", False, 0)


@rollout_app.command("resume")
def rollout_resume(name: str, wait: bool = typer.Option(False, "--wait"), timeout: float = typer.Option(600)) -> None:
    """Let a paused rollout go on."""
    _action(name, "resume", wait, timeout)


def model_history(name: str, output: Format = OutputOption) -> None:
    """A model's revisions (the specs it has had), oldest first."""
    from maas_tui.cli.main import call

    emit(call(lambda c: c.model_history(name)), output, [
        ("REVISION", lambda r: r.revision), ("CHANGE", lambda r: r.change), ("BACKEND", lambda r: r.spec.backend),
        ("SOURCE", lambda r: r.spec.source), ("AGE", lambda r: age(r.created_at))])


def _worker(name: str, action: str) -> None:
    from maas_tui.cli.main import call

    worker = call(lambda c: c.worker_action(name, action))
    console.print(f"worker {worker.name}: {action}ed" if action != "drain" else
                  f"worker {worker.name}: cordoned and draining (instances move with the rollout rules)")


def worker_cordon(name: str) -> None:
    """Stop placing new instances on a worker."""
    _worker(name, "cordon")


def worker_uncordon(name: str) -> None:
    """Place instances on a worker again."""
    _worker(name, "uncordon")


def worker_drain(name: str) -> None:
    """Cordon a worker and move its instances to others, without downtime where capacity allows."""
    _worker(name, "drain")


def worker_approve(name: str) -> None:
    """Let a worker name be taken over: the next registration under NAME goes through without the worker's
    current token (once, within 15 minutes). A restarted agent with its saved token needs no approval; a
    reinstalled host or another machine under the same name does."""
    from maas_tui.cli.main import call

    approval = call(lambda c: c.approve_worker(name))
    held = (f"the registration held from {approval.pending.address}:{approval.pending.agent_port} goes through "
            "at its next try" if approval.pending else "no registration is held now; the next one goes through")
    console.print(f"worker {approval.worker}: approved until {approval.approved_until:%H:%M:%S %Z}; {held}",
                  highlight=False)


def register(model_app: typer.Typer, worker_app: typer.Typer) -> None:
    model_app.add_typer(rollout_app, name="rollout")
    model_app.command("history")(model_history)
    worker_app.command("cordon")(worker_cordon)
    worker_app.command("uncordon")(worker_uncordon)
    worker_app.command("drain")(worker_drain)
    worker_app.command("approve")(worker_approve)
