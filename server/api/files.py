"""`/v2/files`: model files in the workers' caches (rules in server/services/files.py), and the agents'
inventory reports (`PUT /v2/agent/files`)."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from server import schemas
from server.api.errors import ApiError, not_found, parse_whole_number, read_json
from server.api.permissions import require_cluster_role
from server.api.routing import Query, json_out, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.schemas.files import key_or_none
from server.services import files
from server.services.files import FilesRefused


def _refused(exc: FilesRefused) -> ApiError:
    code = {404: "not_found", 409: "conflict"}.get(exc.status, "bad_request")
    return ApiError(exc.status, code, str(exc), exc.details)


@route("GET", "/v2/files", "List model files in the workers' caches (source, revision, size, state, progress)",
       response=schemas.ModelFileOut, response_list=True,
       query={"worker": Query("only this worker's files"), "source": Query("only this source (any of its forms)")})
async def list_files(request: web.Request) -> web.Response:
    query = select(tables.ModelFile).order_by(tables.ModelFile.source, tables.ModelFile.worker_name)
    if worker := request.query.get("worker"):
        query = query.where(tables.ModelFile.worker_name == worker)
    if (source := request.query.get("source")) is not None:
        key = key_or_none(source)
        if key is None:
            raise ApiError(400, "bad_request", f"source {source[:200]!r} is not a model source")
        query = query.where(tables.ModelFile.source == key)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
        return json_out([schemas.ModelFileOut.model_validate(r) for r in rows])


@route("POST", "/v2/files", "Pre-fetch a model source into the caches of chosen workers (admins, operators); "
       "pulling again retries a failed pull", body=schemas.FilePull, response=schemas.ModelFileOut,
       response_list=True, status=202)
async def pull_files(request: web.Request) -> web.Response:
    require_cluster_role(request, "pull model files onto workers")
    body = await read_json(request, schemas.FilePull)
    async with server_of(request).db.session() as s:
        try:
            rows = await files.pull(s, body)
        except FilesRefused as exc:
            raise _refused(exc) from None
        for row in rows:
            record_event(s, "workers", tables.Worker(id=row.worker_id, name=row.worker_name), "FilePullRequested",
                         f"{row.source}: {row.state}", principal_of(request).name)
        await s.commit()
        return json_out([schemas.ModelFileOut.model_validate(r) for r in rows], status=202)


@route("DELETE", "/v2/files/{id}", "Remove a model source from a worker's cache (admins, operators); "
       "refused while an instance there uses it")
async def remove_file(request: web.Request) -> web.Response:
    require_cluster_role(request, "remove model files from workers")
    ref = request.match_info["id"]
    file_id = parse_whole_number(ref, low=1)
    async with server_of(request).db.session() as s:
        row = await s.get(tables.ModelFile, file_id) if file_id is not None else None
        if row is None:
            raise not_found(f"model file {ref[:40]!r}")
        try:
            outcome = await files.remove(s, row)
        except FilesRefused as exc:
            raise _refused(exc) from None
        record_event(s, "workers", tables.Worker(id=row.worker_id, name=row.worker_name), "FileRemoveRequested",
                     f"{row.source}: {outcome}", principal_of(request).name)
        await s.commit()
    return web.json_response({"id": file_id, "source": row.source, "worker": row.worker_name, "state": outcome})


@route("PUT", "/v2/agent/files", "Report the worker's model cache (the agent, when it changed)", auth="worker",
       body=schemas.AgentFileInventory, also=(413,))
async def report_files(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.AgentFileInventory)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        worker = await s.get(tables.Worker, principal.worker_id)
        if worker is None:
            raise not_found("worker")
        changed = await files.apply_inventory(s, worker, body)
        if changed:
            await s.commit()
    return web.json_response({"changed": changed})
