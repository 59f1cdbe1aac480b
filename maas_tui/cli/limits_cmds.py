"""Gateway limits from the command line: the options every `... limits` command shares (`--rpm`,
`--tpm`, `--max-concurrency`, `--budget-day`, `--budget-month`; `none` removes one), `maas model
limits NAME` and `maas limits list`. Keys: `maas key create|update` (resource_cmds.py); teams:
`maas team limits` (team_cmds.py). Who may set which: server/services/limits.py."""

from __future__ import annotations

from typing import Any, Optional

import typer

from maas_tui.cli.model_cmds import model_app
from maas_tui.cli.output import Format, OutputOption, console, emit, fail, print_rows
from maas_tui.render import limits as render

limits_app = typer.Typer(help="Gateway limits: requests and tokens per minute, requests at once, token budgets "
                              "per day and month, on keys, teams and models.", no_args_is_help=True)

RPM = typer.Option(None, "--rpm", help="requests per minute ('none' removes it)")
TPM = typer.Option(None, "--tpm", help="tokens per minute, prompt + completion ('none' removes it)")
MAX_CONCURRENCY = typer.Option(None, "--max-concurrency", help="requests in flight at once ('none' removes it)")
BUDGET_DAY = typer.Option(None, "--budget-day", help="tokens per UTC day, e.g. 100000 or 100k ('none' removes it)")
BUDGET_MONTH = typer.Option(None, "--budget-month", help="tokens per UTC month, e.g. 5M ('none' removes it)")

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


def _number(option: str, value: str) -> int | None:
    text = value.strip().lower()
    if text in ("none", "unlimited"):
        return None
    multiplier = _SUFFIXES.get(text[-1:], 1)
    digits = text[:-1] if multiplier > 1 else text
    try:
        number = round(float(digits) * multiplier) if multiplier > 1 else int(digits)
    except ValueError:
        number = -1
    if number < 0 or (multiplier == 1 and not digits.isdigit()):
        fail(f"{option} {value!r}: give a whole number (100000 or 100k), or 'none'", code=2)
    return number


def changes(rpm: Optional[str], tpm: Optional[str], max_concurrency: Optional[str], budget_day: Optional[str],
            budget_month: Optional[str]) -> dict[str, int | None]:
    """The limits given on the command line (a field left out stays as it is on the server)."""
    given = {"rpm": (rpm, "--rpm"), "tpm": (tpm, "--tpm"), "max_concurrency": (max_concurrency, "--max-concurrency"),
             "budget_day": (budget_day, "--budget-day"), "budget_month": (budget_month, "--budget-month")}
    return {field: _number(option, value) for field, (value, option) in given.items() if value is not None}


def show(limits: Any, output: Format) -> None:
    if output in (Format.json, Format.yaml):
        emit(limits, output)
        return
    console.print(f"{limits.scope} {limits.subject}: {render.summary(limits)}")


def set_or_show(scope: str, name: str, given: dict[str, int | None], output: Format, user: str | None = None) -> None:
    """Set the limits given, or (none given) show the current ones."""
    from maas_tui.cli.main import call

    if given:
        show(call(lambda c: c.set_limits(scope, name, given, user)), output)
        return
    found = [item for item in call(lambda c: c.list_limits(scope))
             if item.subject == name and (user is None or item.owner == user)]
    if not found:
        console.print(f"{scope} {name}: no limits")
        return
    show(found[0], output)


@model_app.command("limits")
def model_limits(name: str = typer.Argument(..., help="the model"), rpm: Optional[str] = RPM,
                 tpm: Optional[str] = TPM, max_concurrency: Optional[str] = MAX_CONCURRENCY,
                 budget_day: Optional[str] = BUDGET_DAY, budget_month: Optional[str] = BUDGET_MONTH,
                 output: Format = OutputOption) -> None:
    """Show or set a model's gateway limits (admins and operators set them): they hold for every request to
    it, whoever sends it. Limits not given stay as they are."""
    set_or_show("model", name, changes(rpm, tpm, max_concurrency, budget_day, budget_month), output)


@limits_app.command("list")
def limits_list(scope: Optional[str] = typer.Option(None, "--scope", help="key, team or model"),
                output: Format = OutputOption) -> None:
    """The limits you may read (your keys', your teams' and their models'; all for admins and operators),
    with what each uses now."""
    from maas_tui.cli.main import call

    if scope is not None and scope not in ("key", "team", "model"):
        fail(f"--scope {scope!r}: give key, team or model", code=2)
    items = call(lambda c: c.list_limits(scope))
    if output in (Format.json, Format.yaml):
        emit(items, output)
        return
    print_rows(render.COLUMNS, render.WIDE_COLUMNS, render.rows(items), output == Format.wide)
