"""`maas backend ...`: the built-in backends and custom ones (deployed as `--backend custom:NAME`)."""

from __future__ import annotations

from pathlib import Path

import typer

from maas_tui.cli.inputs import InputProblem, load_yaml_documents, read_input_file
from maas_tui.cli.output import Format, OutputOption, emit, emit_document, print_renderable, print_rows
from maas_tui.render import backends as render

backend_app = typer.Typer(help="Inference backends: list them, register custom ones.", no_args_is_help=True)

def _show(backends: list, output: Format) -> None:
    if output in (Format.json, Format.yaml):
        emit(backends, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(backends), output == Format.wide)


@backend_app.command("list")
def backend_list(output: Format = OutputOption) -> None:
    """List the backends models can be deployed with."""
    from maas_tui.cli.main import call

    _show(call(lambda c: c.list_backends()), output)


@backend_app.command("get")
def backend_get(name: str = typer.Argument(..., help="a custom backend's name (with or without custom:)"),
                output: Format = OutputOption) -> None:
    """Show a custom backend; -o yaml|json prints a document that `maas backend add -f` takes back."""
    from maas_tui.cli.main import call

    backend = call(lambda c: c.get_backend(name.removeprefix("custom:")))
    if output in (Format.json, Format.yaml):
        emit_document(render.document_of(backend), output)
        return
    _show([backend], output)  # a table of one row, as `list` prints it


@backend_app.command("describe")
def backend_describe(name: str = typer.Argument(..., help="a custom backend's name (with or without custom:)"),
                     output: Format = OutputOption) -> None:
    """Show a custom backend's definition: command, image, env, health and metrics, what users may set."""
    from maas_tui.cli.main import call

    backend = call(lambda c: c.get_backend(name.removeprefix("custom:")))
    if output in (Format.json, Format.yaml):
        emit(backend, output)
        return
    print_renderable(render.describe(backend))


@backend_app.command("add")
def backend_add(file: Path = typer.Option(..., "-f", "--file",
                                          help="YAML (or JSON): name, command, env, health_path, metrics_path, metrics, image; "
                                               "or what `maas backend get NAME -o yaml` prints; - reads stdin"),
                replace: bool = typer.Option(False, "--replace", help="change a backend registered before"),
                output: Format = OutputOption) -> None:
    """Register a custom backend (admin). Deploy it with --backend custom:NAME.

    The command is an argv template (a list, or one string split like a shell would) with the
    placeholders {model_path} {port} {host} {model_name} {gpus} {instance_name} {ray_address}; the
    model's args are appended. A model deployed with `distributed` over several workers gets a Ray
    cluster first: {ray_address} (and RAY_ADDRESS) say where its head is; empty on one worker. `metrics` maps the backend's metric names to unified ones
    (requests_running, requests_waiting, prompt_tokens_total, generation_tokens_total, kv_cache_usage_ratio).
    """
    from maas_tui.cli.main import call, fail

    try:
        text, _ = read_input_file(file)
        documents = load_yaml_documents(text, str(file))
    except InputProblem as exc:
        fail(exc.message, exc.code)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        fail(f"{file}: expected one mapping with name, command, ...")
    if documents[0].get("kind", render.KIND) != render.KIND:
        fail(f"{file}: kind {documents[0]['kind']!r} is not a backend")
    definition = render.definition_of(documents[0])
    added = call(lambda c: c.add_backend(definition, replace=replace))
    if output in (Format.json, Format.yaml):
        emit(added, output)
        return
    _show([added], output)


@backend_app.command("delete")
def backend_delete(name: str = typer.Argument(..., help="a custom backend's name")) -> None:
    """Remove a custom backend (admin). Instances already running keep running."""
    from maas_tui.cli.main import call

    call(lambda c: c.delete_backend(name.removeprefix("custom:")))
    typer.echo(f"backend custom:{name.removeprefix('custom:')} deleted")


@backend_app.command("allow")
def backend_allow(name: str = typer.Argument(..., help="a built-in backend, or custom:NAME"),
                  env: list[str] = typer.Option([], "--env", help="an env name users may set (repeatable)"),
                  arg: list[str] = typer.Option([], "--arg", help="a flag users may pass, e.g. --arg=--ctx-size (repeatable)")) -> None:
    """Set what users other than admins may pass to a backend beyond its own allow-list (admin).

    The names given are the whole list (none clears it). What nobody may pass (loader variables, bind
    flags) cannot be allowed. `maas backend list -o wide` shows the result."""
    from maas_tui.cli.main import call

    allowed = call(lambda c: c.set_backend_allow_list(name, env, arg))
    typer.echo(f"backend {name}: users may also set env {', '.join(allowed.env) or '-'} "
               f"and pass {', '.join(allowed.args) or '-'}")
