"""Benchmarks: a sweep's table (one row per concurrency) and a model's history (one row per result and
level), for `maas bench` and `maas bench history`. Times in milliseconds."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from rich.text import Text

from maas_tui.render import format as fmt
from maas_tui.render.common import Column, Row
from server.schemas.bench import BenchHistory, BenchLevel

LEVEL_COLUMNS: list[Column] = [("CONC", None), ("REQS", None), ("ERRORS", None), ("TTFT p50", None),
                               ("TTFT p95", None), ("ITL p50", None), ("ITL p95", None), ("TOK/S", None)]
HISTORY_COLUMNS: list[Column] = [("ID", None), ("GEN", None), ("SOURCE", None), ("AGE", None), ("BY", None),
                                 *LEVEL_COLUMNS]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def level_cells(level: BenchLevel) -> tuple:
    errors = Text(str(level.errors), style="bold red" if level.errors else "")
    return (str(level.concurrency), str(level.requests), errors, ms(level.ttft_p50), ms(level.ttft_p95),
            ms(level.itl_p50), ms(level.itl_p95), f"{level.tokens_per_s:.1f}")


def level_rows(levels: Iterable[BenchLevel]) -> Iterable[Row]:
    for level in levels:
        yield str(level.concurrency), level_cells(level)


def history_rows(history: BenchHistory, now: datetime) -> Iterable[Row]:
    for result in history.results:
        source = result.source if result.instance is None else f"{result.source} ({result.instance})"
        for level in result.levels:
            yield f"{result.id}/{level.concurrency}", (str(result.id), str(result.generation), source,
                                                       fmt.age(result.created_at, now), result.created_by,
                                                       *level_cells(level))


def gate_line(history: BenchHistory) -> str:
    if history.gate is None:
        return f"{history.model}: generation {history.generation}, no rollout bench gate"
    gate = history.gate
    return (f"{history.model}: generation {history.generation}, bench gate '{gate.expression}' "
            f"({gate.requests} requests of {gate.max_tokens} tokens; judged up to generation {gate.decided_generation})")
