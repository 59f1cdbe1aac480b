"""Guard rails: the layering rules (an import-linter contract in pyproject.toml) and the migrations
matching the tables, both checked on every test run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint(config: Path) -> tuple[int, str]:
    """import-linter in a process of its own: in-process it leaves the logging system changed for the
    tests that run after it (their caplog saw nothing)."""
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), str(config), "--no-cache"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_the_layering_contract_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """server never imports agent or maas_tui; agent uses only the wire contract; maas_tui reaches the
    server only through the client (each allowed exception is listed, with its reason, in pyproject.toml)."""
    monkeypatch.chdir(ROOT)
    code, report = _lint(ROOT / "pyproject.toml")
    assert code == 0, report
    assert "4 kept, 0 broken" in report, report


def test_the_contract_catches_a_forbidden_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without its listed exception, `maas start`'s in-process server (cli/serve.py imports server.app) breaks
    the TUI/CLI contract: the check is live, not vacuous."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "pyproject.toml").read_text()
    without = re.sub(r'\n\s*"maas_tui\.cli\.serve -> server\.\*\*",', "", text)
    assert without != text
    config = tmp_path / "pyproject.toml"
    config.write_text(without)
    code, report = _lint(config)
    assert code != 0 and "maas_tui.cli.serve -> server.app" in report, report


async def test_migrations_build_the_schema_of_the_tables(tmp_path: Path) -> None:
    """Migrations applied to an empty SQLite database give exactly server/db/tables.py's schema (alembic's
    autogenerate comparison finds nothing to add, drop or alter)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from server.db import tables
    from server.db.database import Database

    db = Database(f"sqlite:///{tmp_path / 'drift.db'}")
    try:
        await db.migrate()

        def diff(connection) -> list:
            context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                                   "compare_server_default": False})
            return compare_metadata(context, tables.Base.metadata)

        async with db.engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await db.dispose()
    assert differences == [], "\n".join(map(str, differences))
