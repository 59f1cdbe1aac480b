"""Worker identity: who may register under a worker name that is taken.

A registration under an existing worker's name passes when it presents that worker's current token
(a restarted agent keeps its saved token, agent/identity.py). Without it the registration is held:
it is recorded as a pending request (409) until an admin or operator approves the name with
`maas worker approve NAME`; the approval lets the next registration under that name through, once,
within APPROVAL_SECONDS. The refused agent keeps retrying, so approving the name is approving it.
Kept in the settings table (every server on the database sees it) under `worker-approval/<id>`.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta

from server import schemas
from server.db import tables
from server.db.settings import put_setting

APPROVAL_PREFIX = "worker-approval/"
APPROVAL_SECONDS = 900


def _key(worker: tables.Worker) -> str:
    return f"{APPROVAL_PREFIX}{worker.id}"


async def _stored(session, worker: tables.Worker) -> tuple[tables.Setting | None, schemas.WorkerApproval]:
    row = await session.get(tables.Setting, _key(worker))
    stored = schemas.WorkerApproval.model_validate_json(row.value) if row is not None else None
    if stored is None or stored.worker != worker.name:  # none, or left by a removed worker of the same id
        return row, schemas.WorkerApproval(worker=worker.name)
    return row, stored


def presents_token(worker: tables.Worker, token: str | None, token_hash: str | None) -> bool:
    """The registration carries `worker`'s current token (`token_hash`: its hash, computed by the caller)."""
    return bool(token and token_hash and worker.token_hash and hmac.compare_digest(worker.token_hash, token_hash))


async def take_approval(session, worker: tables.Worker) -> schemas.WorkerApproval | None:
    """Use up the approval of `worker`'s name, when one is given and still valid (in the caller's transaction)."""
    row, approval = await _stored(session, worker)
    if row is None or approval.approved_until is None:
        return None
    await session.delete(row)
    await session.flush()  # hold() may write the key again in this transaction
    return approval if approval.approved_until > datetime.now(UTC) else None


async def hold(session, worker: tables.Worker, body: schemas.WorkerRegister) -> bool:
    """Record the refused registration as pending; True when it is news (not the same agent retrying)."""
    row, approval = await _stored(session, worker)
    new = approval.pending is None or (approval.pending.address, approval.pending.agent_port) != (
        body.address, body.agent_port)
    if new:
        approval.pending = schemas.WorkerRegistrationRequest(address=body.address, agent_port=body.agent_port,
                                                             requested_at=datetime.now(UTC))
        await put_setting(session, _key(worker), approval.model_dump_json())
    return new


async def approve(session, worker: tables.Worker, actor: str) -> schemas.WorkerApproval:
    """Let the next registration under `worker`'s name through (the pending one, which keeps retrying)."""
    _row, approval = await _stored(session, worker)
    approval.approved_by = actor
    approval.approved_until = datetime.now(UTC) + timedelta(seconds=APPROVAL_SECONDS)
    await put_setting(session, _key(worker), approval.model_dump_json())
    return approval


def held_message(name: str) -> str:
    return (f"worker {name!r} is registered already and this registration did not present its current token; "
            f"it waits for an admin or operator: `maas worker approve {name}`")
