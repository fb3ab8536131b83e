"""A CRM contacts API shaped like HubSpot CRM v3 search, over deterministic synthetic data.

`POST /crm/v3/objects/contacts/search` with a `lastmodifieddate` GTE filter, ascending sort,
`limit` (max 200) and `after` paging, a bearer token, and HubSpot's cap of 10,000 results per
query (paging past it answers 400, so a connector must restart the query from its cursor).
"""

from __future__ import annotations

import bisect
import random
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from presend.sandbox.faults import Faults, malformed_records

SEARCH_RESULT_CAP = 10_000
MAX_PAGE_SIZE = 200
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

FIRST_NAMES = [
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
    "Alan",
    "Katherine",
    "Dennis",
    "Barbara",
    "Ken",
    "Frances",
    "Edsger",
    "Radia",
    "Donald",
    "Hedy",
    "Tim",
    "Sophie",
]
LAST_NAMES = [
    "Lovelace",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Turing",
    "Johnson",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Knuth",
    "Lamarr",
]
TIERS = ["bronze", "silver", "gold", "platinum"]
TIME_ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Europe/London",
    "Pacific/Auckland",
]


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _parse_ts(value: str) -> datetime:
    if value.isdigit():
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def make_contact(seed: int, i: int, modified: datetime) -> dict:
    """Contact number `i` of the synthetic CRM: the same seed always gives the same contact."""
    rnd = random.Random(seed * 1_000_003 + i)
    first = rnd.choice(FIRST_NAMES)
    last = rnd.choice(LAST_NAMES)
    email = f"{first}.{last}.{i}@example.com".lower()
    roll = rnd.random()
    if roll < 0.03:
        email = f"{first}.{last}.{i}-at-example.com"  # no @: not a valid email
    elif roll < 0.13:
        email = f"  {email.upper()} "  # upper case and spaces: normalised downstream
    props = {
        "hs_object_id": str(i),
        "email": email,
        "firstname": "" if rnd.random() < 0.05 else f" {first} ",
        "lastname": last,
        "hs_marketable_status": "false" if rnd.random() < 0.08 else "true",
        "loyalty_tier": rnd.choice(TIERS),
        "time_zone": rnd.choice(TIME_ZONES),
        "createdate": _iso(EPOCH + timedelta(seconds=i // 3)),
        "lastmodifieddate": _iso(modified),
    }
    return {"id": str(i), "properties": props}


@dataclass
class CrmState:
    """Contacts kept sorted by (lastmodifieddate, id), as the search API returns them."""

    seed: int
    size: int
    token: str
    clock: datetime = field(default=EPOCH + timedelta(days=30))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.contacts: dict[int, dict] = {}
        self.order: list[tuple[str, int]] = []
        for i in range(1, self.size + 1):
            # Many contacts share a modification second: cursors must be inclusive.
            c = make_contact(self.seed, i, EPOCH + timedelta(seconds=i // 3))
            self.contacts[i] = c
            self.order.append((c["properties"]["lastmodifieddate"], i))
        self.order.sort()

    def advance(self, share: float, hours: float = 1.0) -> int:
        """Move the clock and modify `share` of the contacts (new names or tiers)."""
        with self.lock:
            self.clock += timedelta(hours=hours)
            rnd = random.Random(f"{self.seed}-{self.clock.isoformat()}")
            chosen = rnd.sample(sorted(self.contacts), round(share * self.size))
            for i in chosen:
                props = self.contacts[i]["properties"]
                props["loyalty_tier"] = rnd.choice(TIERS)
                props["firstname"] = f" {rnd.choice(FIRST_NAMES)} "
                props["lastmodifieddate"] = _iso(self.clock)
            self.order = sorted(
                (c["properties"]["lastmodifieddate"], i) for i, c in self.contacts.items()
            )
            return len(chosen)

    def inject(self, contacts: list[dict]) -> list[str]:
        """Write contacts as the CRM's users would, for tests of bad source data.

        Each item patches the properties of contact `id`, or without `id` adds a contact (the
        next id) from `properties`, starting from contact `copy_of`'s when given. Every written
        contact gets a modification time one second after the last, so the next incremental
        extract brings it. Returns the ids written.
        """
        with self.lock:
            self.clock += timedelta(seconds=1)
            written = []
            for item in contacts:
                patch = dict(item.get("properties") or {})
                if item.get("id") is not None:
                    i = int(item["id"])
                    props = self.contacts[i]["properties"]
                else:
                    i = max(self.contacts) + 1
                    source = item.get("copy_of")
                    base = (
                        self.contacts[int(source)]
                        if source is not None
                        else make_contact(self.seed, i, self.clock)
                    )
                    props = dict(base["properties"]) | {
                        "hs_object_id": str(i),
                        "createdate": _iso(self.clock),
                    }
                    self.contacts[i] = {"id": str(i), "properties": props}
                props.update(patch)
                props["lastmodifieddate"] = _iso(self.clock)
                written.append(str(i))
            self.order = sorted(
                (c["properties"]["lastmodifieddate"], i) for i, c in self.contacts.items()
            )
            return written

    def search(self, since: datetime | None, offset: int, limit: int) -> tuple[int, list[dict]]:
        with self.lock:
            start = 0 if since is None else bisect.bisect_left(self.order, (_iso(since), 0))
            lo = start + offset  # slice the page only: copying the tail is O(contacts)
            page = [self.contacts[i] for _, i in self.order[lo : lo + limit]]
            return len(self.order) - start, page


def _error(status: int, message: str, category: str) -> JSONResponse:
    return JSONResponse(
        {"status": "error", "message": message, "category": category}, status_code=status
    )


def create_app(seed: int = 42, size: int = 1000, token: str = "sandbox-crm-token") -> FastAPI:
    """The CRM app; `app.state.crm` holds the data and `app.state.faults` the faults."""
    app = FastAPI(title="presend sandbox CRM (HubSpot CRM v3 shape)")
    state = CrmState(seed=seed, size=size, token=token)
    faults = Faults()
    app.state.crm, app.state.faults = state, faults

    @app.post("/crm/v3/objects/contacts/search")
    async def search(request: Request):
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return _error(401, "Authentication credentials not found.", "INVALID_AUTHENTICATION")
        body = await request.json()
        limit = int(body.get("limit", 10))
        if not 1 <= limit <= MAX_PAGE_SIZE:
            return _error(400, f"limit must be between 1 and {MAX_PAGE_SIZE}", "VALIDATION_ERROR")
        offset = int(body.get("after") or 0)
        if offset >= SEARCH_RESULT_CAP:
            return _error(
                400,
                f"paging past {SEARCH_RESULT_CAP} results is not allowed; narrow the query",
                "VALIDATION_ERROR",
            )
        since = None
        for group in body.get("filterGroups", []):
            for f in group.get("filters", []):
                if f.get("propertyName") == "lastmodifieddate" and f.get("operator") == "GTE":
                    since = _parse_ts(str(f["value"]))
        total, page = state.search(since, offset, min(limit, SEARCH_RESULT_CAP - offset))
        repeated = 0
        if offset and faults.take("duplicate"):
            repeated = 1  # the previous page's last contact again, as a shifted offset repeats
            page = state.search(since, offset - 1, 1)[1] + page
        wanted = body.get("properties") or []
        results = []
        for c in page:
            props = c["properties"]
            if wanted:
                props = {k: props.get(k) for k in wanted} | {
                    "hs_object_id": props["hs_object_id"],
                    "lastmodifieddate": props["lastmodifieddate"],
                }
            results.append(
                {
                    "id": c["id"],
                    "properties": props,
                    "createdAt": c["properties"]["createdate"],
                    "updatedAt": c["properties"]["lastmodifieddate"],
                    "archived": False,
                }
            )
        if faults.take("added_field"):
            for r in results:
                r["properties"] = r["properties"] | {"hs_analytics_source": "ORGANIC_SEARCH"}
        if faults.take("malformed") and results:
            results += malformed_records("id", ["properties", "lastmodifieddate"], results[0])
        out: dict = {"total": total, "results": results}
        nxt = offset + len(page) - repeated
        if nxt < total and page:
            out["paging"] = {"next": {"after": str(nxt)}}
        fault = faults.take("update_while_paging")
        if fault:
            state.advance(float(fault.get("share", 0.05)), hours=1 / 3600)
        return out

    @app.post("/_sandbox/advance")
    async def advance(request: Request):
        body = await request.json()
        changed = state.advance(float(body.get("share", 0.1)), float(body.get("hours", 1)))
        return {"changed": changed, "clock": _iso(state.clock)}

    @app.post("/_sandbox/inject")
    async def inject(request: Request):
        """Bad (or any) contact data on demand: `{"contacts": [{"id"|"copy_of", "properties"}]}`."""
        body = await request.json()
        return {"written": state.inject(body.get("contacts") or []), "clock": _iso(state.clock)}

    faults.install(app)
    return app
