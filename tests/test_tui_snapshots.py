"""Snapshot tests: every TUI screen at 80x24 on the SIMULATED demo cluster (fixed data, fixed clock).

The scenarios live in `maas_tui.tui.screenshots`, which `make screenshots` renders the same way.
Update the SVGs after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import pytest

from maas_tui.tui.screenshots import SCENARIOS, SIZE, make_app, runner

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_screen_snapshot(snap_compare, scenario):
    assert snap_compare(make_app(scenario), terminal_size=SIZE, run_before=runner(scenario))
