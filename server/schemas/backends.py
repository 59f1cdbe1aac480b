"""The wire contract of backends users register (`maas backend add -f FILE`, deployed as `custom:NAME`),
the allow-lists admins add to a backend, and the unified metric names. Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, field_validator, model_validator

from server.schemas import BACKEND_NAME_PATTERN, Schema
from server.schemas.backend_traits import args_problems, env_name_problem, flag_name, template_problem


# Unified names each backend's own metrics are re-exported under (by the agent's /metrics,
# with model, instance and backend labels). A backend definition maps its metric names to these.
UNIFIED_INSTANCE_METRICS: dict[str, str] = {
    "requests_running": "gauge",
    "requests_waiting": "gauge",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "kv_cache_usage_ratio": "gauge",
    "time_to_first_token_seconds_sum": "counter",
    "time_to_first_token_seconds_count": "counter",
}
# What a custom backend's command, image and env may refer to.
# {ray_address}: the Ray head (host:port) of a distributed placement, empty on one worker.
BACKEND_PLACEHOLDERS: tuple[str, ...] = ("model_path", "port", "host", "model_name", "gpus", "instance_name",
                                         "ray_address")


def _placeholders(text: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


class BackendDefinition(Schema):
    """A backend registered by users: how to start it (a command template), and what it answers."""

    name: str = Field(pattern=BACKEND_NAME_PATTERN, description="deploy it with --backend custom:NAME")
    description: str = Field(default="", max_length=1000)
    command: list[str] = Field(min_length=1, max_length=200, description=(
        "argv template; a string is split like a shell would. Placeholders: "
        "{model_path} {port} {host} {model_name} {gpus} {instance_name} {ray_address}; the model's args are appended"))
    image: str | None = Field(default=None, max_length=500, description="container image for the docker runtime")
    env: dict[str, str] = Field(default_factory=dict, description="values may use the same placeholders")
    health_path: str = Field(default="/health", pattern=r"^/[^\s]*$", max_length=500)
    metrics_path: str | None = Field(default="/metrics", pattern=r"^/[^\s]*$", max_length=500)
    metrics: dict[str, str] = Field(default_factory=dict, description=(
        "the backend's metric name -> a unified name (requests_running, prompt_tokens_total, ...)"))

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            import shlex

            return shlex.split(value)
        return value

    @model_validator(mode="after")
    def _known_placeholders(self) -> "BackendDefinition":
        for text in [*self.command, *self.env.values(), *([self.image] if self.image else [])]:
            unknown = [n for n in _placeholders(text) if n not in BACKEND_PLACEHOLDERS]
            if unknown:
                raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {text!r}; "
                                 f"use {', '.join('{' + p + '}' for p in BACKEND_PLACEHOLDERS)}")
        if problem := template_problem(self.command):
            raise ValueError(problem)
        for source, unified in self.metrics.items():
            if unified not in UNIFIED_INSTANCE_METRICS:
                raise ValueError(f"metrics: {source!r} maps to {unified!r}, which is not one of "
                                 f"{', '.join(UNIFIED_INSTANCE_METRICS)}")
        return self


class BackendAllowList(Schema):
    """What an admin lets other users pass to one backend, beyond its built-in allow-list."""

    env: list[str] = Field(default_factory=list, max_length=256, description="environment variable names")
    args: list[str] = Field(default_factory=list, max_length=256, description="flags, e.g. --max-num-seqs")

    @model_validator(mode="after")
    def _allowable(self) -> "BackendAllowList":
        for name in self.env:
            if problem := env_name_problem(name):
                raise ValueError(f"env {name!r}: {problem}")
        for flag in self.args:
            if flag_name(flag) != flag:
                raise ValueError(f"args: {flag!r} is not a flag (write it as --name, without a value)")
            if problems := args_problems([flag], None):
                raise ValueError(problems[0].message)
        self.env, self.args = sorted(set(self.env)), sorted(set(self.args))
        return self


class BackendOut(BackendDefinition):
    builtin: bool = False
    allowed_env: list[str] = Field(default_factory=list, description="env names users other than admins may set")
    allowed_args: list[str] = Field(default_factory=list, description="flags users other than admins may pass")
    created_at: datetime | None = None
    updated_at: datetime | None = None
