"""The TUI's views, one module per resource, each registered in `registry` (name, `:` aliases,
columns, key hints). Importing this package registers them all; `VIEWS` maps each `:` target to its
screen class, in the order they are listed here (the order of the help page and the palette).
"""

from __future__ import annotations

from maas_tui.tui.views import dash, workers, gpus, models, instances, keys, teams, events, audit, describe, \
    logs  # noqa: F401
from maas_tui.tui.views import files  # noqa: F401  (model files in the workers' caches)
from maas_tui.tui.views import alerts  # noqa: F401,E402  (alerts, live)
from maas_tui.tui.views import usage  # noqa: F401  (gateway usage by model, sparklines)
from maas_tui.tui.views.base import MaasScreen, TableScreen
from maas_tui.tui.views.describe import DescribeScreen
from maas_tui.tui.views.logs import LogsScreen
from maas_tui.tui.views.registry import REGISTRY, navigable, resolve_command

VIEWS: dict[str, type[MaasScreen]] = {name: spec.screen for name, spec in navigable().items()}

__all__ = ["VIEWS", "REGISTRY", "MaasScreen", "TableScreen", "DescribeScreen", "LogsScreen", "resolve_command"]
