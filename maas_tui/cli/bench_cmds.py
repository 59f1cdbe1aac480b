"""`maas bench MODEL`: drive the gateway with streamed chat completions (the caller's key) over a
concurrency sweep and report time to first token, inter-token latency, tokens/s and errors; the result is
stored with the model's generation. `maas bench history MODEL`; `maas bench gate MODEL EXPR` gates the
model's next rollouts on a benchmark (server/controllers/bench_gate.py). Measuring: server/schemas/bench.py."""

from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperGroup

from maas_tui.cli.output import Format, OutputOption, emit, fail, now, print_rows
from maas_tui.client import ApiClientError, MaasClient
from maas_tui.render import bench as render
from server.schemas import bench


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it is no subcommand, goes to `default_command`:
    `maas bench MODEL` is `maas bench run MODEL`, `maas bench history MODEL` stays itself."""

    default_command = "run"

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True,
                        help="Benchmark a deployed model through the gateway; its history; the rollout bench gate.")


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > 256 for v in values) or len(values) > 16:
        raise typer.BadParameter("comma-separated whole numbers from 1 to 256, e.g. 1,4,16")
    return values


@bench_app.command("run")
def bench_run(model: str = typer.Argument(..., help="the model's name (as the gateway serves it)"),
              concurrency: str = typer.Option("1,4", help="the sweep: requests in flight at once, comma-separated"),
              requests: int = typer.Option(8, min=1, max=10_000, help="requests per level (at least its concurrency)"),
              prompt_tokens: int = typer.Option(64, min=1, max=100_000, help="prompt length, about one token a word"),
              max_tokens: int = typer.Option(64, min=1, max=100_000, help="output tokens asked for per request"),
              store: bool = typer.Option(True, "--store/--no-store", help="keep the result with the model's generation"),
              output: Format = OutputOption) -> None:
    """Measure MODEL: TTFT, inter-token latency (ms, p50/p95), tokens/s and errors per concurrency."""
    levels_asked = concurrency_list(concurrency)

    async def work(client: MaasClient):
        levels = await bench.sweep(client.stream_completion, model, levels_asked, requests, prompt_tokens, max_tokens)
        stored, refused = None, ""
        if store:
            try:
                stored = await client.store_bench(model, bench.BenchResultCreate(
                    prompt_tokens=prompt_tokens, max_tokens=max_tokens, levels=levels))
            except ApiClientError as exc:  # a viewer may measure, not store: the measurement is still shown
                refused = exc.message
        return levels, stored, refused

    levels, stored, refused = _call(work)
    if output in (Format.json, Format.yaml):
        emit(stored if stored is not None else levels, output)
    else:
        print_rows(render.LEVEL_COLUMNS, [], render.level_rows(levels), wide=False)
        if stored is not None:
            typer.echo(f"stored as result {stored.id} of {model} generation {stored.generation}")
    if refused:
        typer.echo(f"not stored: {refused}", err=True)
    if any(level.first_error for level in levels):
        typer.echo(f"first error: {next(level.first_error for level in levels if level.first_error)}", err=True)
    if all(level.errors == level.requests for level in levels):
        raise typer.Exit(1)  # nothing was measured


@bench_app.command("history")
def bench_history(model: str = typer.Argument(...), output: Format = OutputOption) -> None:
    """MODEL's stored results, newest first (by `maas bench` and by the rollout gate), and its gate."""
    history = _call(lambda c: c.bench_history(model))
    if output in (Format.json, Format.yaml):
        emit(history, output)
        return
    typer.echo(render.gate_line(history))
    print_rows(render.HISTORY_COLUMNS, [], render.history_rows(history, now()), wide=False)


@bench_app.command("gate")
def bench_gate(model: str = typer.Argument(...),
               expression: Optional[str] = typer.Argument(None, help="METRIC OP NUMBER or METRIC OP [K *] previous, "
                                                          "e.g. 'ttft_p95 <= 1.1 * previous'; metrics: "
                                                          + ", ".join(bench.METRICS)),
               requests: int = typer.Option(4, min=1, max=64, help="requests the gate sends to each generation"),
               max_tokens: int = typer.Option(16, min=1, max=1024),
               off: bool = typer.Option(False, "--off", help="remove the gate (a held rollout goes on)")) -> None:
    """Gate MODEL's next rollouts: the new generation's first replica is benchmarked against the previous one;
    when the expression does not hold, the rollout pauses with the reason."""
    if off:
        _call(lambda c: c.delete_bench_gate(model))
        typer.echo(f"{model}: bench gate removed")
        return
    if expression is None:
        fail("give the gate's expression, e.g. 'ttft_p95 <= 1.1 * previous', or --off")
    try:
        bench.parse_gate(expression)
    except bench.GateError as exc:
        fail(str(exc), code=2)
    gate = _call(lambda c: c.set_bench_gate(model, expression, requests, max_tokens))
    typer.echo(f"{model}: rollouts after generation {gate.decided_generation} are gated on '{gate.expression}'")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
