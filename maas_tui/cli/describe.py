"""Printing a dry run of a deploy (`maas model deploy --dry-run`): the estimate, each replica's placement or
why it cannot be placed. Describe pages are in maas_tui/render/<kind>.py, shared with the TUI."""

from __future__ import annotations

from rich.text import Text

from maas_tui.cli.output import console
from maas_tui.render.claims import claim_text
from maas_tui.render.common import small_table
from maas_tui.render.instances import reasons_table
from maas_tui.render.models import estimate_lines
from server import schemas


def print_evaluation(evaluation: schemas.ModelEvaluation) -> None:
    console.print(f"Dry run:    {evaluation.name} (nothing was written)")
    for number, line in enumerate(estimate_lines(evaluation.estimate)):
        console.print(f"{'Memory:' if number == 0 else '':11} {line}")
    table = small_table("REPLICA", "WORKER", "PLACEMENT", wrap="PLACEMENT")
    for replica in evaluation.replicas:
        table.add_row(str(replica.replica), Text(replica.worker or "-"),
                      Text(claim_text(replica.claim) if replica.scheduled else "unschedulable"))
    console.print(table)
    failed = next((r for r in evaluation.replicas if not r.scheduled), None)
    if failed is not None:
        console.print(f"Why replica {failed.replica} cannot be placed:")
        console.print(reasons_table(failed.reasons))
    console.print(evaluation.message)
