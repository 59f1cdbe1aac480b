"""`maas db`: backups of the embedded PostgreSQL and copies of a cluster's state between stores.

These commands work on the store itself (a data folder or a database URL), not through the
API: they run on the server's host, as the user that runs the server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

from maas_tui.cli.output import console, print_error

db_app = typer.Typer(help="The server's database: backup, restore, migrate between stores.", no_args_is_help=True)

DATA_DIR_HELP = "the server's data folder (holds the embedded PostgreSQL) [default: as `maas start`]"


def _fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(1)


def _data_dir(data_dir: Optional[Path]) -> Path:
    from server.config import ServerConfig

    return ServerConfig.from_env(data_dir=data_dir).data_dir


@db_app.command("backup")
def backup(
    file: Path = typer.Argument(..., help="where to write the dump (pg_dump custom format)"),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Dump the embedded PostgreSQL to FILE; the server may be running or stopped."""
    from server.db.maintenance import MaintenanceError, backup as do_backup

    try:
        done = do_backup(_data_dir(data_dir), file)
    except MaintenanceError as exc:
        _fail(str(exc))
    console.print(f"backed up to {done['file']} ({done['bytes']:,} bytes)", highlight=False)


@db_app.command("restore")
def restore(
    file: Path = typer.Argument(..., help="a file written by `maas db backup`"),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Replace the embedded PostgreSQL's data with FILE's, in one transaction."""
    from server.db.maintenance import MaintenanceError, restore as do_restore

    where = _data_dir(data_dir)
    if not yes and not typer.confirm(f"Replace every table of the database in {where} with {file}?"):
        raise typer.Exit(1)
    try:
        done = do_restore(where, file)
    except MaintenanceError as exc:
        _fail(str(exc))
    console.print(f"restored from {done['file']}", highlight=False)
    if done["server_was_running"]:
        console.print("The server is running: restart it (`maas start` again) so that its caches and "
                      "watch stream start from the restored state.", highlight=False)


@db_app.command("migrate")
def migrate(
    to: str = typer.Option(..., "--to", help="target: postgresql://..., mysql://... (or mariadb://) or sqlite:///PATH (new, empty database)"),
    source: Optional[str] = typer.Option(None, "--from", help="source URL [default: the embedded PostgreSQL of --data-dir]"),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Copy every table from one store to another, verified by row counts and checksums."""
    from server.db.embedded import EmbeddedPostgres, EmbeddedPostgresError
    from server.db.maintenance import MaintenanceError, copy_store

    embedded = None
    if source is None:
        embedded = EmbeddedPostgres(_data_dir(data_dir))
        if not (embedded.cluster_dir / "PG_VERSION").is_file():
            _fail(f"no embedded PostgreSQL in {embedded.data_dir}: pass --from URL or the right --data-dir")
        try:
            source = embedded.start()
        except EmbeddedPostgresError as exc:
            _fail(str(exc))
    try:
        report = asyncio.run(copy_store(source, to, progress=lambda t, n: console.print(
            f"  {t}: {n} rows", highlight=False)))
    except (MaintenanceError, ValueError) as exc:
        _fail(str(exc))
    finally:
        if embedded is not None and not embedded.reused:
            embedded.stop()
    total = sum(e.rows for e in report)
    console.print(f"copied {total} rows in {len(report)} tables; counts and checksums match", highlight=False)
