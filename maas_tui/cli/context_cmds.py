"""Commands for scripts: contexts (`maas context ...`, the global `--context`) and `maas apply -f`.

Exit codes: 0 success, 1 failure (the server refused, a file is invalid), 2 usage error
(Click's own for bad options and arguments; ours for missing files and unknown contexts).
"""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from pydantic import ValidationError

from maas_tui import config as client_config
from maas_tui.cli.inputs import InputProblem, load_yaml_documents, read_input_file, server_url
from maas_tui.cli.output import Format, OutputOption, console, emit, print_error
from server import schemas

context_app = typer.Typer(help="Named servers and credentials in one config file (like kubectl contexts).",
                          no_args_is_help=True)

# Commands that may name a context that does not exist yet (they create it).
_CREATES_CONTEXTS = {"login", "context", "version"}


def register(app: typer.Typer) -> None:
    app.add_typer(context_app, name="context")
    app.callback()(global_options)
    app.command("apply")(apply)


def global_options(ctx: typer.Context,
                   context: Optional[str] = typer.Option(None, "--context", envvar="MAAS_CONTEXT",
                                                         help="use this context of the config file")) -> None:
    """MaaS-Base: deploy and serve models on your GPU machines."""
    client_config.ACTIVE_CONTEXT = context
    if context is None:
        return
    if ctx.invoked_subcommand not in _CREATES_CONTEXTS and context not in client_config.read_file()["contexts"]:
        _usage(f"no context named {context!r} (see 'maas context list')")


def _usage(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(2)


def _fail(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(1)


# --- contexts ---------------------------------------------------------------------------


@context_app.command("add")
def context_add(name: str = typer.Argument(..., help="what to call this server"),
                server: str = typer.Option(..., help="the server URL, e.g. http://10.0.0.1:8080"),
                api_key: Optional[str] = typer.Option(None, help="an API key (or log in with --username)"),
                username: Optional[str] = typer.Option(None, help="log in as this user"),
                password: Optional[str] = typer.Option(None, help="password (prompted when missing)"),
                use: bool = typer.Option(False, "--use", help="make it the current context")) -> None:
    """Add (or replace) a context: a server and credentials for it."""
    from maas_tui.cli.main import call

    try:
        server = server_url(server)
    except InputProblem as exc:
        (_usage if exc.code == 2 else _fail)(exc.message)
    if api_key and username:
        _usage("give --api-key or --username, not both")
    if username:
        secret = password if password is not None else getpass.getpass(f"password for {username}: ")
        token = call(lambda c: c.login(username, secret), server=server, token="").token
    elif api_key:
        call(lambda c: c.list_models(), server=server, token=api_key)  # the key works
        token = api_key
    else:
        token = ""
    client_config.save(client_config.ClientConfig(server=server, token=token), context=name)
    if use:
        _set_current(name)
    console.print(f"context {name!r} added ({server})" + (", now current" if use else ""), highlight=False)


def _set_current(name: str) -> None:
    data = client_config.read_file()
    if name not in data["contexts"]:
        _usage(f"no context named {name!r} (see 'maas context list')")
    data["current_context"] = name
    client_config.write_file(data)


@context_app.command("use")
def context_use(name: str) -> None:
    """Make NAME the current context."""
    _set_current(name)
    console.print(f"now using context {name!r}", highlight=False)


@context_app.command("list")
def context_list(output: Format = OutputOption) -> None:
    """List contexts; the current one is marked."""
    data = client_config.read_file()
    active = client_config.active_context_name(data)
    rows = [{"name": n, "current": n == active, "server": c.get("server", ""),
             "credentials": "yes" if c.get("token") else "no"} for n, c in sorted(data["contexts"].items())]
    emit(rows, output, [("CURRENT", lambda r: "*" if r["current"] else ""), ("NAME", lambda r: r["name"]),
                        ("SERVER", lambda r: r["server"]), ("CREDENTIALS", lambda r: r["credentials"])])


@context_app.command("delete")
def context_delete(name: str) -> None:
    """Forget a context."""
    data = client_config.read_file()
    if data["contexts"].pop(name, None) is None:
        _usage(f"no context named {name!r}")
    if data["current_context"] == name:
        data["current_context"] = next(iter(sorted(data["contexts"])), "")
    client_config.write_file(data)
    console.print(f"context {name!r} deleted", highlight=False)


# --- apply ------------------------------------------------------------------------------

POLICY = ("replicas", "max_surge", "max_unavailable", *sorted(schemas.SCALING_FIELDS))


# Keys of a kubectl-style document besides metadata and spec: what `get -o yaml` prints and apply ignores.
_IGNORED = ("apiVersion", "status")


def _documents(file: str) -> tuple[list[schemas.ModelCreate], Path]:
    """Every model of FILE, each checked with the wire contract (strict types, as the server checks them):
    one invalid document fails the whole file before anything is sent."""
    try:
        text, base = read_input_file(file)
        docs = load_yaml_documents(text, file)
    except InputProblem as exc:
        (_usage if exc.code == 2 else _fail)(exc.message)
    models: list[schemas.ModelCreate] = []
    problems: list[str] = []
    for number, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            problems.append(f"document {number}: expected a mapping")
            continue
        kind = doc.get("kind", "Model")
        if kind != "Model":
            problems.append(f"document {number}: kind {kind!r} is not supported (only Model)")
            continue
        if isinstance(doc.get("metadata"), dict) or isinstance(doc.get("spec"), dict):  # kubectl style
            unknown = sorted(set(doc) - {"kind", "metadata", "spec", *_IGNORED})
            if unknown:
                problems.append(f"document {number}: unknown top-level keys {', '.join(map(str, unknown))} "
                                "(a document has kind, metadata, spec and status)")
                continue
            metadata, spec = doc.get("metadata") or {}, doc.get("spec") or {}
            if not isinstance(metadata, dict) or not isinstance(spec, dict):
                problems.append(f"document {number}: metadata and spec must be mappings")
                continue
            body = dict(spec) | {"name": metadata.get("name")}
            if metadata.get("team") is not None:
                body.setdefault("team", metadata["team"])  # like a namespace
        else:
            body = {k: v for k, v in doc.items() if k not in ("kind", *_IGNORED)}
        source = body.get("source")
        if body.get("backend") == "llama.cpp" and isinstance(source, str) and not source.startswith("/"):
            body["source"] = str((base / Path(source).expanduser()).resolve())  # relative to the file
        try:
            models.append(schemas.ModelCreate.model_validate(body, strict=True))
        except ValidationError as exc:
            where = body.get("name") if isinstance(body.get("name"), str) else f"document {number}"
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
            problems.append(f"{where}: {details}")
    names = [m.name for m in models]
    problems += [f"{n}: declared more than once" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        _fail("invalid model file (nothing was applied):\n  " + "\n  ".join(problems))
    if not models:
        _fail(f"{file} declares no model")
    return models, base


def _diff(current: schemas.ModelOut, desired: schemas.ModelCreate) -> dict[str, tuple[Any, Any]]:
    """What PATCH would change: spec fields and POLICY (a model's team is fixed; plan() checks it)."""
    now = current.spec.model_dump(mode="json") | {k: getattr(current, k) for k in POLICY}
    want = desired.model_dump(mode="json", exclude={"name", "team"})
    if desired.max_replicas is not None:
        want.pop("replicas", None)  # autoscaled: replicas is the autoscaler's, a file does not reset it
    return {k: (now.get(k), v) for k, v in want.items() if now.get(k) != v}


def apply(file: str = typer.Option(..., "--file", "-f", help="a YAML file of models (several documents: ---), or -"),
          dry_run: bool = typer.Option(False, "--dry-run", help="print what would change, change nothing"),
          bench_gate: Optional[str] = typer.Option(None, "--bench-gate", help="gate the rollouts this starts on a "
                                                   "benchmark, e.g. 'ttft_p95 <= 1.1 * previous' (maas bench gate)"),
          output: Format = OutputOption) -> None:
    """Create or update models to match a file; a spec change starts a rollout. Idempotent."""
    from maas_tui.cli.main import call
    from maas_tui.client import ApiClientError

    if bench_gate is not None:
        from server.schemas.bench import GateError, parse_gate

        try:
            parse_gate(bench_gate)
        except GateError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None
    models, _ = _documents(file)

    async def plan(client) -> list[tuple[schemas.ModelCreate, schemas.ModelOut | None, dict[str, Any]]]:
        """Read what exists, and have the server check every model that would be created or rolled out
        (a dry run writes nothing) before anything is written."""
        steps = []
        problems: list[str] = []
        for model in models:
            try:
                current = await client.get_model(model.name)
            except ApiClientError as exc:
                if exc.status != 404:
                    raise
                current = None
            if current is not None and model.team is not None and model.team != current.team:
                problems.append(f"{model.name}: belongs to team {current.team!r}, the file says {model.team!r} "
                                "(a model does not change teams: delete it and apply again)")
                continue
            changes = _diff(current, model) if current is not None else {}
            if current is None or any(k not in POLICY for k in changes):
                try:
                    await client.evaluate_model(model.model_dump(mode="json"))
                except ApiClientError as exc:
                    if not 400 <= exc.status < 500:
                        raise
                    problems.append(f"{model.name}: {exc.message}")
            steps.append((model, current, changes))
        if problems:
            raise ApiClientError(400, "invalid", "the server refused (nothing was applied):\n  " + "\n  ".join(problems))
        return steps

    async def work(client) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for model, current, changes in await plan(client):
            entry: dict[str, Any] = {"name": model.name, "action": "", "changes": {}, "error": ""}
            try:
                if current is None:
                    entry["action"] = "create"
                    entry["changes"] = {k: [None, v] for k, v in model.model_dump(mode="json", exclude={"name"}).items()}
                    if not dry_run:
                        await client.create_model(model.model_dump(mode="json"))
                else:
                    spec_change = any(k not in POLICY for k in changes)
                    entry["action"] = ("rollout" if spec_change else "update") if changes else "unchanged"
                    entry["changes"] = {k: list(v) for k, v in changes.items()}
                    if changes and not dry_run:
                        if spec_change and bench_gate:  # set first: the gate judges generations after it
                            await client.set_bench_gate(model.name, bench_gate)
                        await client.update_model(model.name, {k: v[1] for k, v in changes.items()})
            except ApiClientError as exc:
                entry["action"], entry["error"] = "failed", exc.message
            results.append(entry)
        return results

    results = call(work)
    if output in (Format.json, Format.yaml):
        emit([r | {"dry_run": dry_run} for r in results], output)
    else:
        suffix = " (dry run)" if dry_run else ""
        verbs = {"create": "created", "rollout": "updated, rollout started", "update": "updated",
                 "unchanged": "unchanged", "failed": "failed"}
        for r in results:
            verb = verbs[r["action"]] if not dry_run else {"create": "would be created", "rollout":
                                                           "would be updated (rollout)", "update": "would be updated",
                                                           "unchanged": "unchanged", "failed": "failed"}[r["action"]]
            console.print(f"model/{r['name']} {verb}{suffix if r['action'] != 'unchanged' else ''}"
                          + (f": {r['error']}" if r["error"] else ""), highlight=False)
            if r["action"] in ("rollout", "update") or (dry_run and r["action"] == "create"):
                for key, (old, new) in r["changes"].items():
                    if r["action"] == "create":
                        console.print(f"  + {key}: {json.dumps(new)}")
                    else:
                        console.print(f"  ~ {key}: {json.dumps(old)} -> {json.dumps(new)}")
    if any(r["action"] == "failed" for r in results):
        raise typer.Exit(1)


__all__ = ["register", "context_app", "apply", "asyncio"]
