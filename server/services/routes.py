"""The rules of model routes: an alias clients call like a model, weighted between target models,
with fallbacks.

A route belongs to a team, like a model, and may point only at that team's models: who may call the
route may call its targets anyway, so a route never widens what a caller reaches. Its name shares the
models' namespace (a client sends either as `model`): a name taken by the other kind is a 409.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from server import schemas
from server.db import tables


async def name_taken_by_model(session: AsyncSession, name: str) -> bool:
    return await session.scalar(select(tables.Model.id).where(tables.Model.name == name)) is not None


async def name_taken_by_route(session: AsyncSession, name: str) -> bool:
    return await session.scalar(select(tables.ModelRoute.id).where(tables.ModelRoute.name == name)) is not None


async def target_problems(session: AsyncSession, team: str | None, targets: list[schemas.RouteTarget],
                          fallbacks: list[str]) -> list[dict[str, str]]:
    """Why these targets and fallbacks may not be stored for a route of `team`: each must be a model
    of that team. [] when they may."""
    names = [t.model for t in targets] + list(fallbacks)
    found = dict((await session.execute(select(tables.Model.name, tables.Model.team)
                                        .where(tables.Model.name.in_(names)))).all())
    problems = []
    for field, name in [*((f"targets[{i}].model", t.model) for i, t in enumerate(targets)),
                        *((f"fallbacks[{i}]", n) for i, n in enumerate(fallbacks))]:
        if name not in found:
            problems.append({"field": field, "message": f"no model {name!r}"})
        elif found[name] != team:
            # Said without naming the other team: the caller may not see its models.
            problems.append({"field": field, "message": f"model {name!r} is not a model of team {team}"})
    return problems


def route_row(name: str, team: str | None, targets: list[schemas.RouteTarget], fallbacks: list[str]) -> dict[str, Any]:
    return {"name": name, "team": team, "targets": [t.model_dump() for t in targets], "fallbacks": list(fallbacks)}


def describe_targets(targets: list[dict[str, Any]], fallbacks: list[str]) -> str:
    """'a=95 b=5, fallback c': how events and the CLI say where a route sends its requests."""
    text = " ".join(f"{t['model']}={t['weight']}" for t in targets)
    return text + (f", fallback {', '.join(fallbacks)}" if fallbacks else "")
