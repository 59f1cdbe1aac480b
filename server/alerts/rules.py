"""The alert rules: one table. A rule is raised either by an event reason (an event rule: it fires on the
event and resolves after `AlertSettings.event_quiet_seconds` without another such event) or by a state check
the leader runs every `AlertSettings.interval` seconds (a state rule: firing while the check finds its
object, resolved when it no longer does). The checks themselves are in evaluator.py, named here."""

from __future__ import annotations

import os
from dataclasses import dataclass

from server.schemas.alerts import RULE_NAMES, Severity


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    summary: str
    events: tuple[str, ...] = ()  # event reasons that fire it
    check: str | None = None  # the evaluator's state check that finds its objects


RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("InstanceFailing", "critical", "a model's instances fail or keep restarting (crash loop)",
         check="failing_instances"),
    Rule("RolloutStalled", "warning", "a rollout is stalled (failing new instances, its bench gate) or made no "
         "progress for rollout_stall_seconds", check="stalled_rollouts"),
    Rule("WorkerNotReady", "critical", "a worker stopped sending heartbeats", check="workers_not_ready"),
    Rule("MemoryDrift", "warning", "an instance uses far more or far less memory than it claims",
         events=("MemoryDrift",)),
    Rule("GpuTemperature", "warning", "a GPU is at or above gpu_temperature °C (live telemetry)",
         check="hot_gpus"),
    Rule("LimitNearlyReached", "warning", "a quota or a gateway budget is near its limit",
         events=("LimitNearlyReached",)),
)}
assert tuple(RULES) == RULE_NAMES, "server/schemas/alerts.py RULE_NAMES lists the rules in this table's order"

EVENT_RULES: dict[str, Rule] = {reason: rule for rule in RULES.values() for reason in rule.events}


def _number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None


@dataclass
class AlertSettings:
    """MAAS_ALERT_* variables, else these defaults."""

    interval: float = 5.0  # seconds between state checks
    rollout_stall_seconds: float = 600.0  # a rollout without progress this long is stalled
    gpu_temperature: float = 85.0  # °C
    event_quiet_seconds: float = 900.0  # an event rule resolves after this long without its event
    webhook_attempts: int = 6  # tries per delivery, the first included
    webhook_backoff: float = 1.0  # seconds before the first retry; doubles, at most webhook_backoff_max
    webhook_backoff_max: float = 60.0
    webhook_timeout: float = 10.0  # seconds for one try

    @classmethod
    def from_env(cls) -> "AlertSettings":
        return cls(interval=_number("MAAS_ALERT_INTERVAL", cls.interval),
                   rollout_stall_seconds=_number("MAAS_ALERT_ROLLOUT_STALL_SECONDS", cls.rollout_stall_seconds),
                   gpu_temperature=_number("MAAS_ALERT_GPU_TEMPERATURE", cls.gpu_temperature),
                   event_quiet_seconds=_number("MAAS_ALERT_EVENT_QUIET_SECONDS", cls.event_quiet_seconds),
                   webhook_attempts=int(_number("MAAS_ALERT_WEBHOOK_ATTEMPTS", cls.webhook_attempts)),
                   webhook_backoff=_number("MAAS_ALERT_WEBHOOK_BACKOFF", cls.webhook_backoff))
