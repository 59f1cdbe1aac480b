"""`maas file list|pull|rm`: model files in the workers' caches (the table from maas_tui/render/files.py, as in
the TUI's Files view)."""

from __future__ import annotations

from typing import Optional

import typer

from maas_tui.cli.output import Format, OutputOption, emit, fail, now, print_rows
from maas_tui.render import files as render

file_app = typer.Typer(help="Model files in the workers' caches: list, pre-fetch (pull), remove (rm)",
                       no_args_is_help=True)


def _selection(workers: Optional[str]) -> tuple[list[str], dict[str, str]]:
    """--workers w1,w2 (names), key=value[,key=value] (labels), or all."""
    if not workers or workers == "all":
        return [], {}
    parts = [p.strip() for p in workers.split(",") if p.strip()]
    labels = [p for p in parts if "=" in p]
    if labels and len(labels) != len(parts):
        fail("--workers: give worker names or key=value labels, not both")
    if labels:
        return [], dict(p.split("=", 1) for p in labels)
    return parts, {}


@file_app.command("list")
def list_files(worker: Optional[str] = typer.Option(None, help="only this worker's files"),
               source: Optional[str] = typer.Option(None, help="only this source (any of its forms)"),
               output: Format = OutputOption) -> None:
    """Which model sources are in which worker's cache: revision, size, state (pulling with progress, ready,
    error with its message), last use."""
    from maas_tui.cli.main import call

    found = call(lambda c: c.list_files(worker, source))
    if output in (Format.json, Format.yaml):
        emit(found, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(found, now()), output == Format.wide)


@file_app.command("pull")
def pull(source: str = typer.Argument(..., help="hf://ORG/NAME[@REV][/FILE], ms://..., ORG/NAME or a path on the workers"),
         workers: Optional[str] = typer.Option(None, "--workers", "-w", help=(
             "worker names (w1,w2), labels (key=value,...) or all (the default)")),
         output: Format = OutputOption) -> None:
    """Pre-fetch a model into the caches of the chosen workers (their agents download it; `maas file list`
    shows progress). Pulling again retries a failed pull. Operators and admins."""
    from maas_tui.cli.main import call

    names, labels = _selection(workers)
    rows = call(lambda c: c.pull_files(source, names, labels))
    if output in (Format.json, Format.yaml):
        emit(rows, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(rows, now()), output == Format.wide)


@file_app.command("rm")
def remove(source: str = typer.Argument(..., help="the source, in any of its forms"),
           workers: Optional[str] = typer.Option(None, "--workers", "-w", help=(
               "worker names (w1,w2), labels (key=value,...) or all (the default)"))) -> None:
    """Remove a model from the workers' caches. Refused where an instance uses it. Operators and admins."""
    from maas_tui.cli.main import call
    from maas_tui.client import ApiClientError

    names, labels = _selection(workers)

    async def work(client):
        rows = await client.list_files(source=source)
        if names:
            rows = [r for r in rows if r.worker_name in names]
        if labels:
            chosen = {w.name for w in await client.list_workers()
                      if all((w.labels or {}).get(k) == v for k, v in labels.items())}
            rows = [r for r in rows if r.worker_name in chosen]
        outcomes = []
        for row in rows:
            try:
                outcomes.append((row, (await client.remove_file(row.id))["state"]))
            except ApiClientError as exc:
                outcomes.append((row, f"refused: {exc.message}"))
        return outcomes

    outcomes = call(work)
    if not outcomes:
        fail(f"no worker's cache holds {source}" + (f" among {workers}" if workers else ""))
    for row, outcome in outcomes:
        typer.echo(f"{row.worker_name}: {row.source}: {outcome}")
    if any(o.startswith("refused") for _, o in outcomes):
        raise typer.Exit(1)
