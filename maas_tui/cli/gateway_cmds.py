"""`maas gateway ...`: the production gateway's configuration."""

from __future__ import annotations

import sys

import typer
import yaml

gateway_app = typer.Typer(help="The gateway: Higress objects for production traffic.", no_args_is_help=True)
higress_app = typer.Typer(help="Higress (McpBridge, Ingress, WasmPlugin objects).", no_args_is_help=True)
gateway_app.add_typer(higress_app, name="higress")


@higress_app.command("export")
def higress_export() -> None:
    """Print the Higress objects for what runs now, as multi-document YAML (kubectl apply -f -)."""
    from maas_tui.cli.main import call

    objects = call(lambda c: c.higress_objects())
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
