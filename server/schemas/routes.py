"""The wire contract of model routes: an alias that clients call like a model, weighted between
target models, with fallbacks. Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, field_validator, model_validator

from server.schemas import MODEL_NAME_PATTERN, TEAM_NAME_PATTERN, Schema

MAX_ROUTE_TARGETS = 16


class RouteTarget(Schema):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    weight: int = Field(ge=1, le=1_000_000, description="share of the requests: weight / sum of the weights")


def _check_models(targets: list[RouteTarget] | None, fallbacks: list[str] | None) -> None:
    names = [t.model for t in targets or ()] + list(fallbacks or ())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"a model may appear once among the targets and fallbacks: {', '.join(repeated)}")


class RouteCreate(Schema):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="what clients send as `model`")
    team: str | None = Field(default=None, pattern=TEAM_NAME_PATTERN, description=(
        "the owning team; its models are the only possible targets (default: your only team)"))
    targets: list[RouteTarget] = Field(min_length=1, max_length=MAX_ROUTE_TARGETS)
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_ROUTE_TARGETS,
                                 description="models tried in order when no target answers")

    @field_validator("fallbacks")
    @classmethod
    def _fallback_names(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a model name")
        return value

    @model_validator(mode="after")
    def _once_each(self) -> "RouteCreate":
        _check_models(self.targets, self.fallbacks)
        return self


class RouteUpdate(Schema):
    targets: list[RouteTarget] | None = Field(default=None, min_length=1, max_length=MAX_ROUTE_TARGETS)
    fallbacks: list[str] | None = Field(default=None, max_length=MAX_ROUTE_TARGETS)

    @field_validator("fallbacks")
    @classmethod
    def _fallback_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else RouteCreate._fallback_names(value)

    @model_validator(mode="after")
    def _once_each(self) -> "RouteUpdate":
        _check_models(self.targets, self.fallbacks)
        return self


class RouteOut(Schema):
    id: int
    name: str
    team: str | None = None
    targets: list[RouteTarget]
    fallbacks: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime | None = None
