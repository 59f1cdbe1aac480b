"""`maas gateway ...`: the production gateway's configuration."""

from __future__ import annotations

import sys

import typer
import yaml

from maas_tui.cli.output import Format, OutputOption, emit

gateway_app = typer.Typer(help="The gateway: Higress objects for production traffic.", no_args_is_help=True)
higress_app = typer.Typer(help="Higress (McpBridge, Ingress, WasmPlugin objects).", no_args_is_help=True)
gateway_app.add_typer(higress_app, name="higress")


@higress_app.command("export")
def higress_export() -> None:
    """Print the Higress objects for what runs now, as multi-document YAML (kubectl apply -f -)."""
    from maas_tui.cli.main import call

    objects = call(lambda c: c.higress_objects())
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))


SYNC_COLUMNS = [
    ("APPLIER", lambda s: s["applier"]), ("TARGET", lambda s: s["target"]),
    ("IN SYNC", lambda s: {True: "yes", False: "NO", None: "not yet"}[s["ok"]]),
    ("FAILURES", lambda s: s["failures"]), ("CONFLICTS", lambda s: s["conflicts"]), ("ERROR", lambda s: s["error"]),
]


@higress_app.command("status")
def higress_status(output: Format = OutputOption) -> None:
    """How the Higress sync fares (on the leading server): each applier, in sync or why not."""
    from maas_tui.cli.main import call

    sync = call(lambda c: c.higress_sync())
    if not sync and output not in (Format.json, Format.yaml):
        sys.stdout.write("no Higress sync here: start the server with --higress-dir or --higress-kubeconfig "
                         "(on several servers, ask the leader)\n")
        return
    emit(sync, output, SYNC_COLUMNS)
