"""Alerts (everyone: those about their teams' objects and the cluster's), silences and webhooks (admins and
operators manage them; everyone may list silences). The rules and their evaluation: server/alerts/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web
from sqlalchemy import select

from server.api.errors import ApiError, bad_request, not_found, parse_whole_number, read_json
from server.api.permissions import require_cluster_role
from server.api.routing import Query, integer, json_out, one_of, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.schemas.alerts import AlertOut, SilenceCreate, SilenceOut, WebhookCreate, WebhookOut
from server.services import alerts as alert_rules
from server.services.secrets import SecretsUnavailable


@route("GET", "/v2/alerts", "Alerts about your teams' objects and the cluster's (every alert for admins and "
       "operators), newest first", response=AlertOut, response_list=True,
       query={"state": Query("firing, resolved or all (default all)", one_of("firing", "resolved", "all")),
              "limit": Query("how many (default 200)", integer(1, 1000, 200))})
async def list_alerts(request: web.Request) -> web.Response:
    state = request.query.get("state", "all")
    if state not in ("firing", "resolved", "all"):
        raise bad_request("state is firing, resolved or all")
    limit = parse_whole_number(request.query.get("limit", "200"), low=1, high=1000)
    if limit is None:
        raise bad_request("limit must be a whole number from 1 to 1000")
    query = select(tables.Alert).order_by(tables.Alert.id.desc()).limit(limit)
    if state != "all":
        query = query.where(tables.Alert.state == state)
    if (visible := alert_rules.alert_clause(principal_of(request))) is not None:
        query = query.where(visible)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(query)).scalars().all()
    return json_out([AlertOut.model_validate(r) for r in rows])


def _silence_out(row: tables.AlertSilence, now: datetime) -> SilenceOut:
    out = SilenceOut.model_validate(row)
    out.active = alert_rules.silence_covers(row, row.rule, row.object_name or "", now)
    return out


@route("GET", "/v2/alerts/silences", "Silences, the active ones first", response=SilenceOut, response_list=True)
async def list_silences(request: web.Request) -> web.Response:
    now = datetime.now(UTC)
    async with server_of(request).db.session() as s:
        rows = (await s.execute(select(tables.AlertSilence).order_by(tables.AlertSilence.id.desc()).limit(500))
                ).scalars().all()
    silences = [_silence_out(r, now) for r in rows]
    return json_out(sorted(silences, key=lambda x: not x.active))


@route("POST", "/v2/alerts/silences", "Silence a rule (for one object or all) for a time: its alerts are still "
       "recorded but not sent to webhooks (admins and operators)", body=SilenceCreate, response=SilenceOut,
       status=201)
async def create_silence(request: web.Request) -> web.Response:
    require_cluster_role(request, "silence alerts")
    body = await read_json(request, SilenceCreate)
    now = datetime.now(UTC)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        row = tables.AlertSilence(rule=body.rule, object_name=body.object_name, comment=body.comment,
                                  created_by=principal.name, created_at=now,
                                  ends_at=now + timedelta(seconds=body.duration_seconds))
        s.add(row)
        await s.flush()
        record_event(s, "alerts", _named(f"silence {row.id}"), "AlertSilenced",
                     f"{body.rule} for {body.object_name or 'every object'} until {row.ends_at:%Y-%m-%d %H:%M} UTC",
                     principal.name)
        await s.commit()
        return json_out(_silence_out(row, now), status=201)


@route("DELETE", "/v2/alerts/silences/{id}", "Expire a silence now (admins and operators)", response=SilenceOut)
async def expire_silence(request: web.Request) -> web.Response:
    require_cluster_role(request, "expire silences")
    silence_id = parse_whole_number(request.match_info["id"], low=1)
    now = datetime.now(UTC)
    async with server_of(request).db.session() as s:
        row = await s.get(tables.AlertSilence, silence_id) if silence_id else None
        if row is None:
            raise not_found(f"silence {request.match_info['id']!r}")
        if alert_rules.silence_covers(row, row.rule, row.object_name or "", now):
            row.ends_at = now
            record_event(s, "alerts", _named(f"silence {row.id}"), "AlertSilenceExpired", row.rule,
                         principal_of(request).name)
            await s.commit()
        return json_out(_silence_out(row, now))


def _webhook_out(row: tables.AlertWebhook) -> WebhookOut:
    return WebhookOut(id=row.id, url=row.url, signed=row.secret_ciphertext is not None, created_by=row.created_by,
                      created_at=row.created_at, last_status=row.last_status, last_delivered_at=row.last_delivered_at)


@route("GET", "/v2/alerts/webhooks", "Where alerts are sent (admins and operators)", response=WebhookOut,
       response_list=True)
async def list_webhooks(request: web.Request) -> web.Response:
    require_cluster_role(request, "list alert webhooks")
    async with server_of(request).db.session() as s:
        rows = (await s.execute(select(tables.AlertWebhook).order_by(tables.AlertWebhook.id))).scalars().all()
    return json_out([_webhook_out(r) for r in rows])


@route("POST", "/v2/alerts/webhooks", "Send alerts to a URL (http or https; a secret signs each body; admins "
       "and operators)", body=WebhookCreate, response=WebhookOut, status=201)
async def add_webhook(request: web.Request) -> web.Response:
    require_cluster_role(request, "add alert webhooks")
    body = await read_json(request, WebhookCreate)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        sealed = None
        if body.secret is not None:
            try:
                sealed = (await alert_rules.secret_box(server_of(request), s)).seal(body.secret)
            except SecretsUnavailable as exc:
                raise ApiError(503, "secrets_unavailable", str(exc)) from None
        row = tables.AlertWebhook(url=body.url, secret_ciphertext=sealed, created_by=principal.name)
        s.add(row)
        await s.flush()
        record_event(s, "alerts", _named(f"webhook {row.id}"), "WebhookAdded", _host_of(body.url), principal.name)
        await s.commit()
        return json_out(_webhook_out(row), status=201)


@route("DELETE", "/v2/alerts/webhooks/{id}", "Stop sending alerts to a webhook (admins and operators)")
async def delete_webhook(request: web.Request) -> web.Response:
    require_cluster_role(request, "remove alert webhooks")
    hook_id = parse_whole_number(request.match_info["id"], low=1)
    async with server_of(request).db.session() as s:
        row = await s.get(tables.AlertWebhook, hook_id) if hook_id else None
        if row is None:
            raise not_found(f"webhook {request.match_info['id']!r}")
        await s.delete(row)
        record_event(s, "alerts", _named(f"webhook {row.id}"), "WebhookRemoved", _host_of(row.url),
                     principal_of(request).name)
        await s.commit()
    return web.json_response({"deleted": hook_id})


def _named(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(id=None, name=name, team=None)


def _host_of(url: str) -> str:
    """What an event says of a webhook: its host, not its path (a path may hold a token)."""
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


SNAPSHOT_ALERTS = 200


async def alerts_snapshot(session, caller) -> list[dict]:
    """What a watch of `alerts` starts with: the newest alerts the caller may see (every firing one among
    them, as long as fewer than SNAPSHOT_ALERTS fire), oldest first."""
    query = select(tables.Alert).order_by(tables.Alert.state != "firing", tables.Alert.id.desc()).limit(SNAPSHOT_ALERTS)
    if (visible := alert_rules.alert_clause(caller)) is not None:
        query = query.where(visible)
    rows = (await session.execute(query)).scalars().all()
    return [AlertOut.model_validate(r).model_dump(mode="json") for r in sorted(rows, key=lambda r: r.id)]
