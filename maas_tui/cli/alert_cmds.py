"""`maas alert ...`: alerts (list, describe), silences and webhooks. Tables from maas_tui/render/alerts.py,
as in the TUI's Alerts view. The rules: server/alerts/rules.py; `maas alert rules` lists them."""

from __future__ import annotations

import re
from typing import Optional

import typer

from maas_tui.cli.bench_cmds import DefaultCommandGroup
from maas_tui.cli.output import Format, OutputOption, emit, fail, now, print_renderable, print_rows
from maas_tui.render import alerts as render
from server.schemas.alerts import RULE_NAMES, SILENCE_LONGEST, webhook_url_problem

alert_app = typer.Typer(no_args_is_help=True, help="Alerts: what is wrong now and what was; silences; webhooks.")
webhook_app = typer.Typer(no_args_is_help=True, help="Where alerts are POSTed (admins and operators).")


class _SilenceGroup(DefaultCommandGroup):
    default_command = "add"


silence_app = typer.Typer(cls=_SilenceGroup, no_args_is_help=True,
                          help="Silence a rule for a time: `maas alert silence RULE [--object NAME] --for 2h`; "
                               "`silence list`, `silence expire ID`.")
alert_app.add_typer(webhook_app, name="webhook")
alert_app.add_typer(silence_app, name="silence")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `2h`, `1d` (or combined, `1h30m`) as seconds."""
    parts = re.fullmatch(r"\s*((?:\d+\s*[smhd]\s*)+)", text or "")
    if parts is None:
        raise typer.BadParameter("a duration such as 30m, 2h, 1d or 1h30m")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)\s*([smhd])", parts.group(1)))
    if not 60 <= seconds <= SILENCE_LONGEST:
        raise typer.BadParameter(f"from 1m to {SILENCE_LONGEST // 86400}d")
    return seconds


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


@alert_app.command("list")
def alert_list(state: str = typer.Option("all", help="firing, resolved or all"),
               limit: int = typer.Option(200, min=1, max=1000), output: Format = OutputOption) -> None:
    """Alerts about your teams' objects and the cluster's, firing first."""
    if state not in ("firing", "resolved", "all"):
        fail("--state is firing, resolved or all", code=2)
    alerts = _call(lambda c: c.list_alerts(state, limit))
    if output in (Format.json, Format.yaml):
        emit(alerts, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(alerts, now(), truncate=False), output == Format.wide)


@alert_app.command("describe")
def alert_describe(alert_id: int = typer.Argument(..., min=1)) -> None:
    """One alert: its rule, object, times and message."""
    alert = next((a for a in _call(lambda c: c.list_alerts("all", 1000)) if a.id == alert_id), None)
    if alert is None:
        fail(f"no alert {alert_id} (or not one you may see)")
    print_renderable(render.describe(alert, now()))


@alert_app.command("rules")
def alert_rules() -> None:
    """The rules alerts come from."""
    for name in RULE_NAMES:
        typer.echo(name)


@silence_app.command("add")
def silence_add(rule: str = typer.Argument(..., help="one of " + ", ".join(RULE_NAMES)),
                object_name: Optional[str] = typer.Option(None, "--object", help="only this object (default: all)"),
                duration: str = typer.Option(..., "--for", help="how long: 30m, 2h, 1d"),
                comment: str = typer.Option("", help="why")) -> None:
    """Silence RULE (for one object, or every one) for a time: its alerts are recorded, not sent."""
    if rule not in RULE_NAMES:
        fail(f"unknown rule {rule!r}; the rules are {', '.join(RULE_NAMES)}", code=2)
    seconds = parse_duration(duration)
    made = _call(lambda c: c.silence(rule, seconds, object_name, comment))
    typer.echo(f"silence {made.id}: {rule} for {object_name or 'every object'} until "
               f"{made.ends_at:%Y-%m-%d %H:%M} UTC")


@silence_app.command("list")
def silence_list(output: Format = OutputOption) -> None:
    """Silences, the active ones first."""
    silences = _call(lambda c: c.list_silences())
    if output in (Format.json, Format.yaml):
        emit(silences, output)
        return
    print_rows(render.SILENCE_COLUMNS, [], render.silence_rows(silences, now()), wide=False)


@silence_app.command("expire")
def silence_expire(silence_id: int = typer.Argument(..., min=1)) -> None:
    """End a silence now."""
    _call(lambda c: c.expire_silence(silence_id))
    typer.echo(f"silence {silence_id} expired")


@webhook_app.command("add")
def webhook_add(url: str = typer.Argument(..., help="http:// or https://"),
                secret: Optional[str] = typer.Option(None, help="signs each body: X-MaaS-Signature: sha256=HMAC("
                                                     "secret, timestamp + '.' + body)"),
                output: Format = OutputOption) -> None:
    """POST every alert that fires or resolves to URL (JSON), retried with backoff."""
    if problem := webhook_url_problem(url):
        fail(problem, code=2)
    hook = _call(lambda c: c.add_webhook(url, secret))
    if output in (Format.json, Format.yaml):
        emit(hook, output)
        return
    typer.echo(f"webhook {hook.id}: {hook.url}" + (" (signed)" if hook.signed else ""))


@webhook_app.command("list")
def webhook_list(output: Format = OutputOption) -> None:
    """The webhooks and how their last delivery ended."""
    hooks = _call(lambda c: c.list_webhooks())
    if output in (Format.json, Format.yaml):
        emit(hooks, output)
        return
    print_rows(render.WEBHOOK_COLUMNS, [], render.webhook_rows(hooks, now()), wide=False)


@webhook_app.command("rm")
def webhook_rm(hook_id: int = typer.Argument(..., min=1)) -> None:
    """Stop sending alerts to a webhook."""
    _call(lambda c: c.delete_webhook(hook_id))
    typer.echo(f"webhook {hook_id} removed")


def register(app: typer.Typer) -> None:
    app.add_typer(alert_app, name="alert")
