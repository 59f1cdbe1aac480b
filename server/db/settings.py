"""The settings table as a key-value store (JSON or text values under namespaced keys)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from server.db import tables


async def put_setting(session: AsyncSession, key: str, value: str) -> tables.Setting:
    """Insert or replace one row, in the caller's transaction."""
    row = await session.get(tables.Setting, key)
    if row is None:
        row = tables.Setting(key=key, value=value)
        session.add(row)
    else:
        row.value = value
    return row
