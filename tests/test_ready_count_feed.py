"""The change feed republishes a model (with its ready count, one count query) only when one of its
instances starts or stops running, not for every change of a running instance (server/db/database.py).
SQLite, through the real session and its flush hooks."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from server.db import tables
from server.db.database import Database

SPEC = {"source": "/models/tiny.gguf", "backend": "llama.cpp"}


async def test_a_model_line_follows_running_in_and_out_and_nothing_else(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'feed.db'}")
    try:
        await db.migrate()
        async with db.session() as s:
            model = tables.Model(name="tiny", spec=SPEC)
            s.add(model)
            await s.flush()
            instance = tables.ModelInstance(name="tiny-0", model_id=model.id, model_name="tiny", generation=1,
                                            spec=SPEC, state="starting")
            s.add(instance)
            await s.commit()
            model_id, instance_id = model.id, instance.id

        async def model_lines_after(change) -> list[int]:
            async with db.session() as s:
                last = await s.scalar(select(tables.ChangeLog.id).order_by(tables.ChangeLog.id.desc()).limit(1))
                change(await s.get(tables.ModelInstance, instance_id))
                await s.commit()
                rows = (await s.execute(select(tables.ChangeLog.object).where(
                    tables.ChangeLog.id > last, tables.ChangeLog.kind == "models"))).scalars().all()
            return [row["ready_replicas"] for row in rows if row["id"] == model_id]

        def set_state(state: str, message: str = ""):
            def change(instance: tables.ModelInstance) -> None:
                instance.state, instance.state_message = state, message
            return change

        assert await model_lines_after(set_state("running", "serving")) == [1]
        # Running again (an agent's re-report after its restart) with another message: the count stands.
        assert await model_lines_after(set_state("running", "adopted after an agent restart")) == []
        assert await model_lines_after(set_state("error", "exited")) == [0]
        assert await model_lines_after(set_state("starting")) == []
        assert await model_lines_after(set_state("running")) == [1]

        async with db.session() as s:  # a running instance deleted: the count drops
            last = await s.scalar(select(tables.ChangeLog.id).order_by(tables.ChangeLog.id.desc()).limit(1))
            await s.delete(await s.get(tables.ModelInstance, instance_id))
            await s.commit()
            rows = (await s.execute(select(tables.ChangeLog.object).where(
                tables.ChangeLog.id > last, tables.ChangeLog.kind == "models"))).scalars().all()
        assert [row["ready_replicas"] for row in rows] == [0]
    finally:
        await db.dispose()
