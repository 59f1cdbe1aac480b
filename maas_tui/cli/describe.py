"""Printing scheduling results for people: dry runs, `model describe`, `instance describe`."""

from __future__ import annotations

from rich.table import Table, box

from maas_tui.cli.output import age, console, human_bytes, instance_state
from server import schemas


def _table(*headers: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def estimate_lines(estimate: schemas.MemoryEstimateOut | None) -> list[str]:
    if estimate is None:
        return []
    context = ""
    if estimate.max_model_len:
        context = f" for {estimate.max_model_len} tokens"
        if estimate.concurrency and estimate.concurrency > 1:
            context += f" x {estimate.concurrency} sequences"
    lines = [f"Memory:     {human_bytes(estimate.total_bytes)} on one device = weights {human_bytes(estimate.weights_bytes)}"
             f" + KV cache {human_bytes(estimate.kv_cache_bytes)}{context}"
             f" + overhead {human_bytes(estimate.overhead_bytes)} (weights from: {estimate.method})"]
    if estimate.tensor_parallel_sizes:
        lines.append(f"TP sizes:   {', '.join(map(str, estimate.tensor_parallel_sizes))}")
    lines += [f"Note:       {note}" for note in estimate.notes]
    return lines


def claim_text(claim: schemas.ResourceClaim | None) -> str:
    if claim is None:
        return "-"
    if claim.device == "cpu":
        return f"CPU, {human_bytes(claim.ram_bytes)} RAM"
    text = f"GPU {','.join(map(str, claim.gpu_indexes))} x {human_bytes(claim.vram_bytes_per_gpu)}"
    if claim.tensor_parallel_size > 1 or claim.pipeline_parallel_size > 1:
        text += f" (tp={claim.tensor_parallel_size}, pp={claim.pipeline_parallel_size})"
    for sub in claim.subordinate_workers:
        text += f" + {sub.worker_name} GPU {','.join(map(str, sub.gpu_indexes))}"
    if claim.gpu_layers is not None:
        text += f", {claim.gpu_layers} layers on GPU, {human_bytes(claim.ram_bytes)} in RAM"
    if claim.gpu_memory_utilization is not None:
        text += f", util {claim.gpu_memory_utilization:g}"
    return text


def reasons_table(reasons: list[schemas.UnschedulableReason]) -> Table:
    table = _table("WORKER", "REASON", "NEED", "FREE", "GPU", "MESSAGE")
    for r in reasons:
        worker = r.worker or ("cluster" if r.count is None else f"({r.count} workers)")
        gpu = "" if r.gpu is None else str(r.gpu)
        if r.gpus_needed:
            gpu += f" ({r.gpus_fitting or 0}/{r.gpus_needed} fit)"
        table.add_row(worker, r.reason, human_bytes(r.need_bytes), human_bytes(r.free_bytes), gpu, r.message)
    return table


def print_evaluation(evaluation: schemas.ModelEvaluation) -> None:
    console.print(f"Dry run:    {evaluation.name} (nothing was written)", highlight=False)
    for line in estimate_lines(evaluation.estimate):
        console.print(line, highlight=False)
    table = _table("REPLICA", "WORKER", "PLACEMENT")
    for replica in evaluation.replicas:
        table.add_row(str(replica.replica), replica.worker or "-",
                      claim_text(replica.claim) if replica.scheduled else "unschedulable")
    console.print(table)
    failed = next((r for r in evaluation.replicas if not r.scheduled), None)
    if failed is not None:
        console.print(f"Why replica {failed.replica} cannot be placed:", highlight=False)
        console.print(reasons_table(failed.reasons))
    console.print(evaluation.message, highlight=False)


def print_instance(instance: schemas.InstanceOut, events: list[schemas.EventOut]) -> None:
    rows = [("Name", instance.name), ("ID", str(instance.id)), ("Model", f"{instance.model_name} (generation {instance.generation})"),
            ("State", instance_state(instance) + (f": {instance.state_message}" if instance.state_message else "")),
            ("Worker", instance.worker_name or "-"),
            ("Endpoint", f"{instance.address}:{instance.port}" if instance.port else "-"),
            ("Claim", claim_text(instance.claim)), ("Restarts", str(instance.restart_count)),
            ("Age", age(instance.created_at))]
    for label, value in rows:
        console.print(f"{label + ':':11} {value}", highlight=False)
    if instance.claim is not None:
        for line in estimate_lines(instance.claim.estimate):
            console.print(line, highlight=False)
    if instance.schedule_reasons:
        console.print("Why it is not scheduled:", highlight=False)
        console.print(reasons_table(instance.schedule_reasons))
    print_events(events)


def print_events(events: list[schemas.EventOut]) -> None:
    if not events:
        return
    console.print("Events:", highlight=False)
    table = _table("AGE", "OBJECT", "REASON", "BY", "MESSAGE")
    for e in events:
        table.add_row(age(e.created_at), e.object_name, e.reason, e.actor, e.message.splitlines()[0] if e.message else "")
    console.print(table)


def print_model(description: schemas.ModelDescription) -> None:
    model = description.model
    spec = model.spec
    rows = [("Name", model.name), ("Backend", spec.backend), ("Source", spec.source),
            ("Replicas", f"{model.ready_replicas}/{model.replicas} ready (generation {model.generation}, {model.state})"),
            ("Placement", f"{spec.placement_strategy}" + (", distributed" if spec.distributed else "")
             + (f", selector {spec.worker_selector}" if spec.worker_selector else "")
             + (f", gpu_type {spec.gpu_type}" if spec.gpu_type else "")
             + (", manual: " + "; ".join(f"{s.worker} GPU {s.gpu_indexes}" for s in spec.gpu_selector)
                if spec.gpu_selector else ""))]
    for label, value in rows:
        console.print(f"{label + ':':11} {value}", highlight=False)
    for line in estimate_lines(description.estimate):
        console.print(line, highlight=False)
    if description.estimate_error:
        console.print(f"Memory:     cannot estimate: {description.estimate_error}", highlight=False)
    table = _table("ID", "NAME", "STATE", "WORKER", "PLACEMENT", "AGE")
    for i in description.instances:
        table.add_row(str(i.id), i.name, instance_state(i), i.worker_name or "-", claim_text(i.claim), age(i.created_at))
    console.print("Instances:", highlight=False)
    console.print(table)
    for i in description.instances:
        if i.schedule_reasons:
            console.print(f"Why {i.name} is not scheduled:", highlight=False)
            console.print(reasons_table(i.schedule_reasons))
    print_events(description.events)
