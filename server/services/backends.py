"""Backends' allow-lists: what users other than admins may pass to each backend.

The built-in part is the traits table (server/schemas/backend_traits.py); an admin adds to it per
backend (`maas backend allow`), stored in the settings table under `backend-allow/NAME`.
"""

from __future__ import annotations

from sqlalchemy import select

from server import schemas
from server.db import tables
from server.schemas.backend_traits import BACKEND_TRAITS, COMMON_ENV

ALLOW_PREFIX = "backend-allow/"


async def allow_lists(session) -> dict[str, schemas.BackendAllowList]:
    """What admins added to each backend's allow-list, by backend (`vllm`, `custom:tgi`)."""
    query = select(tables.Setting).where(tables.Setting.key.startswith(ALLOW_PREFIX, autoescape=True))
    return {row.key[len(ALLOW_PREFIX):]: schemas.BackendAllowList.model_validate_json(row.value)
            for row in (await session.execute(query)).scalars()}


def effective(backend: str, extra: schemas.BackendAllowList | None) -> tuple[frozenset[str], frozenset[str]]:
    """(env names, flags) users other than admins may pass: the backend's own plus the admin's additions."""
    traits = BACKEND_TRAITS.get(backend)
    env = traits.allowed_env if traits else COMMON_ENV
    args = traits.allowed_args if traits else frozenset()
    if extra is not None:
        env, args = env | set(extra.env), args | set(extra.args)
    return env, args


async def allowed_for(session, backend: str) -> tuple[frozenset[str], frozenset[str]]:
    row = await session.get(tables.Setting, ALLOW_PREFIX + backend)
    return effective(backend, schemas.BackendAllowList.model_validate_json(row.value) if row else None)
