"""Behavioural events from an analytics export API with a cursor.

`GET /api/v1/export/events?since=<ISO 8601>&limit=<n ≤ 10,000>` answers
`{"data": [...], "next_cursor": "…" | null}` in (occurred_at, id) order; `cursor=<next_cursor>`
(alone, with `limit`) continues. `since` is inclusive. Bearer token auth. Events never change;
the clock adds new ones. Events name the CRM's contacts by email (lower-cased, as analytics
tools keep it) and the shop's products.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from presend.sandbox.faults import Faults, malformed_records
from presend.sandbox.shop import ID_BASE, contact_email
from presend.sandbox.table import CLOCK_START, Table, from_ms, mix, to_ms

PATH = "/api/v1/export/events"
MAX_LIMIT = 10_000
TYPES = ("product_viewed", "product_viewed", "product_viewed", "added_to_cart", "email_opened")


@lru_cache(maxsize=1 << 16)  # events share their millisecond three at a time, in order
def utc_iso(ms: int) -> str:
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class EventsState:
    def __init__(self, seed: int, size: int, contacts: int, products: int, token: str) -> None:
        self.seed, self.contacts, self.products, self.token = seed, contacts, products, token
        self.clock = CLOCK_START
        self.lock = threading.Lock()
        self.table = Table(size, self._make, per_tick=3)

    def _fields(self, i: int) -> tuple[str, int, int | None, str]:
        """Event i's type, contact number, product id and source: a pure function of the seed."""
        h = mix(self.seed, i)
        kind = TYPES[h % len(TYPES)]
        contact = (h >> 8) % max(1, self.contacts) + 1
        product = None
        if kind != "email_opened" and self.products:
            product = ID_BASE + (h >> 40) % self.products + 1
        return kind, contact, product, "web" if h & 1 else "app"

    def _make(self, i: int, occurred_ms: int | None = None) -> dict:
        ms = occurred_ms if occurred_ms is not None else self.table.base_ms(i)
        kind, contact, product, source = self._fields(i)
        return {
            "id": f"evt_{i:010d}",
            "type": kind,
            "occurred_at": utc_iso(ms),
            "email": contact_email(self.seed, contact).strip().lower(),
            "product_id": product,
            "properties": {"source": source},
        }

    def record_json(self, key: tuple[int, int]) -> str:
        """The record of `key` as the API's JSON text: what json.dumps of `table.get` gives,
        written for base events without building the dict (the export serves millions)."""
        ms, i = key
        if self.table.is_changed(i):
            return json.dumps(self.table.get(i), separators=(",", ":"))
        kind, contact, product, source = self._fields(i)
        return (
            f'{{"id":"evt_{i:010d}","type":"{kind}","occurred_at":"{utc_iso(ms)}",'
            f'"email":{_email_json(self.seed, contact)},'
            f'"product_id":{"null" if product is None else product},'
            f'"properties":{{"source":"{source}"}}}}'
        )

    def advance(self, share: float, hours: float = 1.0) -> int:
        """Move the clock and add `share` times size new events, spread over the hour just past."""
        with self.lock:
            start = to_ms(self.clock)
            self.clock += timedelta(hours=hours)
            span = to_ms(self.clock) - start
            n = round(share * self.table.size)
            for k in range(n):
                i = self.table.next_index
                ms = start + (k + 1) * span // max(1, n)
                self.table.put(i, ms, self._make(i, ms))
            return n


@cache
def _email_json(seed: int, contact: int) -> str:
    return json.dumps(contact_email(seed, contact).strip().lower())


def _encode(key: tuple[int, int], since: int | None) -> str:
    raw = json.dumps({"after": list(key), "since": since}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


def create_app(
    seed: int = 42,
    events: int = 20_000,
    contacts: int = 1000,
    products: int = 200,
    token: str = "sandbox-events-token",
) -> FastAPI:
    """The events app; `app.state.events` holds the data and `app.state.faults` the faults."""
    app = FastAPI(title="presend sandbox analytics export (cursor-paged events)")
    state = EventsState(seed, events, contacts, products, token)
    faults = Faults()
    app.state.events, app.state.faults = state, faults

    @app.get(PATH)
    def export(request: Request):
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return JSONResponse({"error": "invalid token"}, status_code=401)
        q = request.query_params
        try:
            limit = int(q.get("limit", 1000))
            if "cursor" in q:
                if set(q) - {"cursor", "limit"}:
                    raise ValueError("cursor cannot be combined with other filters")
                position = _decode(q["cursor"])
                since, after = position["since"], tuple(position["after"])
            else:
                since = None
                if q.get("since"):
                    ts = datetime.fromisoformat(q["since"].replace("Z", "+00:00"))
                    since = to_ms(ts if ts.tzinfo else ts.replace(tzinfo=UTC))
                after = None
        except ValueError as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        if not 1 <= limit <= MAX_LIMIT:
            return JSONResponse({"error": f"limit must be 1..{MAX_LIMIT}"}, status_code=400)
        keys = state.table.page_keys(since, after, limit)
        more = bool(keys) and bool(state.table.page_keys(since, keys[-1], 1))
        records = None  # the page's records as dicts, built only when a fault rewrites them

        def as_dicts() -> list[dict]:
            return records if records is not None else [state.table.get(i) for _, i in keys]

        if after and faults.take("duplicate"):
            records = [state.table.get(after[1]), *as_dicts()]
        if faults.take("added_field") and keys:
            records = [r | {"session_id": f"s-{r['id']}"} for r in as_dicts()]
        if faults.take("malformed") and keys:
            records = as_dicts()
            records = records + malformed_records("id", ["occurred_at"], records[0])
        fault = faults.take("update_while_paging")
        if fault:  # events never change: new ones arrive while the client pages
            state.advance(float(fault.get("share", 0.05)), hours=0)
        nxt = json.dumps(_encode(keys[-1], since) if more else None)
        if records is None:
            data = ",".join(state.record_json(k) for k in keys)
        else:
            data = ",".join(json.dumps(r, separators=(",", ":")) for r in records)
        body = f'{{"data":[{data}],"next_cursor":{nxt}}}'
        return Response(body.encode(), media_type="application/json")

    @app.post("/_sandbox/advance")
    async def advance(request: Request):
        body = await request.json()
        added = state.advance(float(body.get("share", 0.1)), float(body.get("hours", 1)))
        return {"added": added, "clock": state.clock.isoformat()}

    faults.install(app)
    return app
