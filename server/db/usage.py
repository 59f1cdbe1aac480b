"""Adding gateway usage: one upsert per (day, hour, key, model, route), dialect by dialect."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from server.db.tables import Usage


async def add_usage(session: AsyncSession, batch: dict[tuple, list[int]]) -> None:
    dialect = session.bind.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert
    else:  # pragma: no cover - other stores come with their own upsert
        raise NotImplementedError(f"usage upsert for {dialect}")
    rows: list[dict[str, Any]] = [
        {"day": day, "hour": hour, "api_key_id": key_id, "api_key_name": key_name, "user_id": user_id,
         "model_name": model, "route": route, "team": team,
         "requests": counts[0], "prompt_tokens": counts[1], "completion_tokens": counts[2]}
        for (day, hour, key_id, key_name, user_id, model, route, team), counts in batch.items()
    ]
    statement = insert(Usage).values(rows)
    if dialect == "mysql":  # the unique key (day, hour, key, model, route) is the conflict target
        statement = statement.on_duplicate_key_update(
            {column: getattr(Usage, column) + getattr(statement.inserted, column)
             for column in ("requests", "prompt_tokens", "completion_tokens")})
        await session.execute(statement)
        return
    statement = statement.on_conflict_do_update(
        index_elements=["day", "hour", "api_key_id", "model_name", "route"],
        set_={column: getattr(Usage, column) + getattr(statement.excluded, column)
              for column in ("requests", "prompt_tokens", "completion_tokens")},
    )
    await session.execute(statement)
