"""A stateful sandbox ESP speaking SendGrid Marketing Contacts and Klaviyo bulk profile import.

SendGrid: field definitions (reserved + custom, created by name), `PUT /v3/marketing/contacts`
answered 202 with a job id, import job polling, per-record errors (invalid email, field too
long). Klaviyo: `POST /api/profile-bulk-import-jobs` (with the `revision` header), job
polling, paged import errors. Both: a job is still pending at its first look, as with the
vendors; rate limits per route with the vendor's headers and 429 + Retry-After; injected
faults (transient 5xx, transient per-record rejections). `/_sandbox/*` reads back what the
ESP holds and configures limits and faults.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MAX_CONTACTS_PER_REQUEST = 30_000
MAX_BODY_BYTES = 6_000_000
KLAVIYO_MAX_PROFILES = 10_000
KLAVIYO_MAX_BODY_BYTES = 5_000_000
FIELD_MAX_LENGTH = {"email": 254, "first_name": 50, "last_name": 50}
CUSTOM_TEXT_MAX_LENGTH = 1000
KLAVIYO_ATTRIBUTE_MAX_LENGTH = 255
KLAVIYO_PROPERTY_MAX_LENGTH = 2048
TRANSIENT_REASON = "contact is being updated by another operation; retry later"
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
RESERVED = [
    "first_name",
    "last_name",
    "email",
    "alternate_emails",
    "address_line_1",
    "address_line_2",
    "city",
    "state_province_region",
    "postal_code",
    "country",
    "phone_number",
    "external_id",
]
# The write routes: what the push sends, and what a configured rate limit applies to.
SENDGRID_UPSERT = "PUT /v3/marketing/contacts"
KLAVIYO_IMPORT = "POST /api/profile-bulk-import-jobs"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(ts: datetime | None = None) -> str:
    return (ts or datetime.now(UTC)).isoformat()


@dataclass
class EspState:
    api_key: str
    state_file: Path | None = None
    contacts: dict[str, dict] = field(default_factory=dict)  # SendGrid, by email
    custom_fields: dict[str, dict] = field(default_factory=dict)  # SendGrid, by id
    profiles: dict[str, dict] = field(default_factory=dict)  # Klaviyo, by email
    jobs: dict[str, dict] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    # route -> (limit, window seconds); route -> (window start, used)
    rate_limits: dict[str, tuple[int, int]] = field(default_factory=dict)
    windows: dict[str, tuple[float, int]] = field(default_factory=dict)
    fail_next: int = 0  # the next n vendor API requests answer 503
    throttle_next: int = 0  # the next n vendor API requests answer 429, Retry-After: 1
    write_latency: float = 0.0  # seconds a write request takes after the ESP counted it
    transient_rejects: dict[str, int] = field(default_factory=dict)  # email -> times left
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        if self.state_file and self.state_file.exists():
            doc = json.loads(self.state_file.read_text())
            self.contacts = doc["contacts"]
            self.custom_fields = doc["custom_fields"]
            self.profiles = doc.get("profiles", {})

    def save(self) -> None:
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            doc = {
                "contacts": self.contacts,
                "custom_fields": self.custom_fields,
                "profiles": self.profiles,
            }
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.state_file)

    def transient(self, email: str | None) -> bool:
        """Whether this record is to be rejected transiently this time (fault injection)."""
        key = str(email or "").strip().lower()
        left = self.transient_rejects.get(key, 0)
        if left > 0:
            self.transient_rejects[key] = left - 1
            return True
        return False

    def take(self, route: str) -> tuple[bool, dict[str, int]] | None:
        """Count a request against its route's fixed window; None when the route is unlimited."""
        if route not in self.rate_limits:
            return None
        limit, window = self.rate_limits[route]
        now = time.time()
        # Windows aligned to multiples of `window` since the epoch, so X-RateLimit-Reset
        # (whole epoch seconds) is exact.
        start = math.floor(now / window) * window
        held_start, used = self.windows.get(route, (start, 0))
        if held_start != start:
            used = 0
        allowed = used < limit
        if allowed:
            used += 1
        self.windows[route] = (start, used)
        return allowed, {"limit": limit, "remaining": limit - used, "reset_at": start + window}

    def upsert(self, job_id: str, records: list[dict]) -> None:
        """Apply a SendGrid import job; records that fail validation are the job's errors."""
        errors = []
        created = updated = 0
        names = {fid: f["name"] for fid, f in self.custom_fields.items()}
        for rec in records:
            problem = _validate(rec, names)
            if problem is None and self.transient(rec.get("email")):
                problem = TRANSIENT_REASON
            if problem:
                errors.append({"email": rec.get("email"), "message": problem})
                continue
            email = rec["email"].strip().lower()
            held = self.contacts.get(email)
            if held is None:
                created += 1
                # New contacts start subscribed; an upsert never changes this afterwards.
                held = {"email": email, "subscribed": True, "custom_fields": {}}
                self.contacts[email] = held
            else:
                updated += 1
            for key, value in rec.items():
                if key == "custom_fields":
                    for fid, v in value.items():
                        held["custom_fields"][names[fid]] = v
                elif key != "email":
                    held[key] = value
        job = self.jobs[job_id]
        status = (
            "completed" if not errors else "errored" if len(errors) < len(records) else "failed"
        )
        job.update(status=status, finished_at=_now())
        job["results"].update(
            created_count=created, updated_count=updated, errored_count=len(errors)
        )
        job["errors"] = errors
        if errors:
            job["results"]["errors_url"] = f"/_sandbox/jobs/{job_id}/errors"

    def import_profiles(self, job_id: str, profiles: list[dict]) -> None:
        """Apply a Klaviyo bulk import job; invalid profiles become its import errors."""
        errors = []
        for i, prof in enumerate(profiles):
            attrs = prof.get("attributes") or {}
            problem = _validate_profile(attrs)
            code = "invalid"
            if problem is None and self.transient(attrs.get("email")):
                problem, code = TRANSIENT_REASON, "temporarily_unavailable"
            if problem:
                errors.append(
                    {
                        "type": "import-error",
                        "id": str(uuid.uuid4()),
                        "attributes": {
                            "code": code,
                            "title": "Invalid input" if code == "invalid" else "Try again",
                            "detail": problem,
                            "source": {"pointer": f"/data/attributes/profiles/data/{i}"},
                            "original_payload": attrs,
                        },
                    }
                )
                continue
            email = attrs["email"].strip().lower()
            # New profiles are never subscribed by an import: consent is a separate API.
            held = self.profiles.setdefault(
                email, {"email": email, "subscribed": False, "properties": {}}
            )
            for key, value in attrs.items():
                if key == "properties":
                    held["properties"].update(value or {})
                elif key != "email":
                    held[key] = value
            unset = ((prof.get("meta") or {}).get("patch_properties") or {}).get("unset") or []
            for key in [unset] if isinstance(unset, str) else unset:
                held["properties"].pop(key, None)
        job = self.jobs[job_id]
        job["attributes"].update(
            status="complete",
            completed_count=len(profiles) - len(errors),
            failed_count=len(errors),
            completed_at=_iso(),
        )
        job["errors"] = errors


def _validate(rec: dict, custom_names: dict[str, str]) -> str | None:
    email = rec.get("email")
    if not isinstance(email, str) or not EMAIL_RE.match(email.strip()):
        return "invalid email"
    for key, limit in FIELD_MAX_LENGTH.items():
        if isinstance(rec.get(key), str) and len(rec[key]) > limit:
            return f"{key} is longer than {limit} characters"
    for fid, value in (rec.get("custom_fields") or {}).items():
        if fid not in custom_names:
            return f"unknown custom field id {fid}"
        if isinstance(value, str) and len(value) > CUSTOM_TEXT_MAX_LENGTH:
            return f"{custom_names[fid]} is longer than {CUSTOM_TEXT_MAX_LENGTH} characters"
    return None


def _validate_profile(attrs: dict) -> str | None:
    email = attrs.get("email")
    if not isinstance(email, str) or not EMAIL_RE.match(email.strip()):
        return "invalid email"
    for key, value in attrs.items():
        if (
            key != "properties"
            and isinstance(value, str)
            and len(value) > KLAVIYO_ATTRIBUTE_MAX_LENGTH
        ):
            return f"{key} is longer than {KLAVIYO_ATTRIBUTE_MAX_LENGTH} characters"
    for key, value in (attrs.get("properties") or {}).items():
        if isinstance(value, str) and len(value) > KLAVIYO_PROPERTY_MAX_LENGTH:
            return f"property {key} is longer than {KLAVIYO_PROPERTY_MAX_LENGTH} characters"
    return None


def _sendgrid_error(message: str, status: int, field_: str | None = None) -> JSONResponse:
    return JSONResponse({"errors": [{"field": field_, "message": message}]}, status_code=status)


def _klaviyo_error(status: int, code: str, detail: str) -> JSONResponse:
    body = {"errors": [{"id": str(uuid.uuid4()), "code": code, "title": code, "detail": detail}]}
    return JSONResponse(body, status_code=status, media_type="application/vnd.api+json")


def create_app(api_key: str = "sandbox-esp-key", state_file: Path | None = None) -> FastAPI:
    """The ESP app; `app.state.esp` holds its state for tests."""
    app = FastAPI(title="presend sandbox ESP (SendGrid and Klaviyo shapes)")
    state = EspState(api_key=api_key, state_file=state_file)
    state.load()
    app.state.esp = state

    @app.middleware("http")
    async def vendor_rules(request: Request, call_next):
        path = request.url.path
        if path.startswith("/_sandbox"):
            return await call_next(request)
        route = f"{request.method} {_route_name(path)}"
        klaviyo = path.startswith("/api/")
        with state.lock:
            state.requests[route] += 1
        if klaviyo:
            if request.headers.get("authorization") != f"Klaviyo-API-Key {state.api_key}":
                return _klaviyo_error(401, "not_authenticated", "authorization required")
            if not request.headers.get("revision"):
                return _klaviyo_error(400, "invalid", "the revision header is required")
        elif request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _sendgrid_error("authorization required", 401)
        with state.lock:
            taken = state.take(route)
            failing = state.fail_next > 0
            if failing:
                state.fail_next -= 1
            if state.throttle_next > 0:
                # As if another client of this account had used up the window.
                state.throttle_next -= 1
                taken = (False, {"limit": 1, "remaining": 0, "reset_at": time.time() + 1})
        headers = {}
        if taken is not None:
            allowed, info = taken
            if klaviyo:
                headers = {
                    "RateLimit-Limit": str(info["limit"]),
                    "RateLimit-Remaining": str(info["remaining"]),
                    "RateLimit-Reset": str(math.ceil(info["reset_at"] - time.time())),
                }
            else:
                headers = {
                    "X-RateLimit-Limit": str(info["limit"]),
                    "X-RateLimit-Remaining": str(info["remaining"]),
                    "X-RateLimit-Reset": str(int(info["reset_at"])),
                }
            if not allowed:
                retry = str(max(1, math.ceil(info["reset_at"] - time.time())))
                resp = (
                    _klaviyo_error(429, "throttled", "rate limit exceeded")
                    if klaviyo
                    else _sendgrid_error("too many requests", 429)
                )
                resp.headers.update(headers | {"Retry-After": retry})
                return resp
        if failing:
            resp = (
                _klaviyo_error(503, "service_unavailable", "try again")
                if klaviyo
                else _sendgrid_error("service unavailable", 503)
            )
            resp.headers.update(headers)
            return resp
        if state.write_latency and route in (SENDGRID_UPSERT, KLAVIYO_IMPORT):
            # A large body takes a while to accept; the rate limit counted it on arrival.
            await asyncio.sleep(state.write_latency)
        resp = await call_next(request)
        resp.headers.update(headers)
        return resp

    # --- SendGrid ------------------------------------------------------------------------

    @app.get("/v3/marketing/field_definitions")
    def field_definitions():
        return {
            "custom_fields": list(state.custom_fields.values()),
            "reserved_fields": [
                {"id": f"_rf{i}_T", "name": n, "field_type": "Text"} for i, n in enumerate(RESERVED)
            ],
        }

    @app.post("/v3/marketing/field_definitions")
    async def create_field(request: Request):
        body = await request.json()
        name, field_type = body.get("name"), body.get("field_type")
        if not name or field_type not in ("Text", "Number", "Date"):
            return _sendgrid_error("invalid", 400, "name")
        with state.lock:
            taken = {f["name"].lower() for f in state.custom_fields.values()}
            if name.lower() in RESERVED or name.lower() in taken:
                return _sendgrid_error("field name already exists", 400, "name")
            fid = f"e{len(state.custom_fields) + 1}_{field_type[0]}"
            state.custom_fields[fid] = {"id": fid, "name": name, "field_type": field_type}
            state.save()
        return state.custom_fields[fid]

    @app.put("/v3/marketing/contacts")
    async def upsert(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return _sendgrid_error("body too large", 413)
        body = json.loads(raw)
        contacts = body.get("contacts") or []
        if not 1 <= len(contacts) <= MAX_CONTACTS_PER_REQUEST:
            return _sendgrid_error("1 to 30000 contacts", 400, "contacts")
        job_id = str(uuid.uuid4())
        with state.lock:
            state.jobs[job_id] = {
                "id": job_id,
                "status": "pending",
                "job_type": "upsert",
                "started_at": _now(),
                "results": {
                    "requested_count": len(contacts),
                    "created_count": 0,
                    "updated_count": 0,
                    "deleted_count": 0,
                    "errored_count": 0,
                },
                "_records": contacts,
            }
        return JSONResponse({"job_id": job_id}, status_code=202)

    @app.get("/v3/marketing/contacts/imports/{job_id}")
    def import_status(job_id: str):
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None or "results" not in job:
                return _sendgrid_error("not found", 404, "id")
            # Like the vendor, a job is still pending at the first look.
            if job["status"] == "pending" and job.pop("_seen", False):
                state.upsert(job_id, job.pop("_records"))
                state.save()
            elif job["status"] == "pending":
                job["_seen"] = True
            return {k: v for k, v in job.items() if not k.startswith("_") and k != "errors"}

    # --- Klaviyo -------------------------------------------------------------------------

    @app.post("/api/profile-bulk-import-jobs")
    async def bulk_import(request: Request):
        raw = await request.body()
        if len(raw) > KLAVIYO_MAX_BODY_BYTES:
            return _klaviyo_error(413, "too_large", "the payload is larger than 5MB")
        try:
            data = json.loads(raw)["data"]
            profiles = data["attributes"]["profiles"]["data"]
            assert data["type"] == "profile-bulk-import-job"
        except (ValueError, KeyError, TypeError, AssertionError):
            return _klaviyo_error(400, "invalid", "not a profile-bulk-import-job document")
        if not 1 <= len(profiles) <= KLAVIYO_MAX_PROFILES:
            return _klaviyo_error(400, "invalid", "1 to 10000 profiles per job")
        job_id = uuid.uuid4().hex.upper()[:26]
        now = datetime.now(UTC)
        with state.lock:
            state.jobs[job_id] = {
                "type": "profile-bulk-import-job",
                "id": job_id,
                "attributes": {
                    "status": "queued",
                    "created_at": _iso(now),
                    "total_count": len(profiles),
                    "completed_count": 0,
                    "failed_count": 0,
                    "completed_at": None,
                    "expires_at": _iso(now + timedelta(days=7)),
                    "started_at": None,
                },
                "_profiles": profiles,
            }
            doc = {k: v for k, v in state.jobs[job_id].items() if not k.startswith("_")}
        return JSONResponse({"data": doc}, status_code=202, media_type="application/vnd.api+json")

    @app.get("/api/profile-bulk-import-jobs/{job_id}")
    def bulk_import_status(job_id: str):
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None or "attributes" not in job:
                return _klaviyo_error(404, "not_found", "no such job")
            attrs = job["attributes"]
            # Like the vendor, a job is still queued at the first look.
            if attrs["status"] == "queued" and job.pop("_seen", False):
                attrs["started_at"] = _iso()
                state.import_profiles(job_id, job.pop("_profiles"))
                state.save()
            elif attrs["status"] == "queued":
                job["_seen"] = True
            doc = {k: v for k, v in job.items() if not k.startswith("_") and k != "errors"}
        return JSONResponse({"data": doc}, media_type="application/vnd.api+json")

    @app.get("/api/profile-bulk-import-jobs/{job_id}/import-errors")
    def bulk_import_errors(job_id: str, request: Request):
        job = state.jobs.get(job_id)
        if job is None or "attributes" not in job:
            return _klaviyo_error(404, "not_found", "no such job")
        size = int(request.query_params.get("page[size]", 20))
        if not 1 <= size <= 100:
            return _klaviyo_error(400, "invalid", "page[size] must be 1 to 100")
        start = int(request.query_params.get("page[cursor]", 0))
        errors = job.get("errors", [])
        page = errors[start : start + size]
        links = {"self": str(request.url)}
        if start + size < len(errors):
            links["next"] = f"{request.url.path}?page[size]={size}&page[cursor]={start + size}"
        return JSONResponse({"data": page, "links": links}, media_type="application/vnd.api+json")

    # --- read-back and faults ------------------------------------------------------------

    @app.get("/_sandbox/jobs/{job_id}/errors")
    def job_errors(job_id: str):
        return state.jobs[job_id].get("errors", [])

    @app.get("/_sandbox/contacts")
    def held_contacts():
        return state.contacts

    @app.get("/_sandbox/klaviyo/profiles")
    def held_profiles():
        return state.profiles

    @app.post("/_sandbox/unsubscribe")
    async def unsubscribe(request: Request):
        body = await request.json()
        held = state.profiles if body.get("vendor") == "klaviyo" else state.contacts
        with state.lock:
            held[body["email"]]["subscribed"] = False
            state.save()
        return held[body["email"]]

    @app.post("/_sandbox/subscribe")
    async def subscribe(request: Request):
        body = await request.json()
        held = state.profiles if body.get("vendor") == "klaviyo" else state.contacts
        with state.lock:
            held[body["email"]]["subscribed"] = True
            state.save()
        return held[body["email"]]

    @app.get("/_sandbox/requests")
    def request_counts():
        return dict(state.requests)

    @app.post("/_sandbox/faults")
    async def faults(request: Request):
        """Configure rate limits and faults.

        `{"rate_limits": {"PUT /v3/marketing/contacts": [limit, window_seconds]},
        "fail_next": n, "throttle_next": n, "transient_rejects": {"email": times},
        "write_latency": seconds}`.
        """
        body = await request.json()
        with state.lock:
            if "rate_limits" in body:
                state.rate_limits = {
                    route: (int(v[0]), int(v[1])) for route, v in body["rate_limits"].items()
                }
                state.windows.clear()
            if "fail_next" in body:
                state.fail_next = int(body["fail_next"])
            if "throttle_next" in body:
                state.throttle_next = int(body["throttle_next"])
            if "write_latency" in body:
                state.write_latency = float(body["write_latency"])
            if "transient_rejects" in body:
                state.transient_rejects = {
                    e.strip().lower(): int(n) for e, n in body["transient_rejects"].items()
                }
        return {"ok": True}

    return app


def _route_name(path: str) -> str:
    if path.startswith("/v3/marketing/contacts/imports/"):
        return "/v3/marketing/contacts/imports/{id}"
    if path.startswith("/api/profile-bulk-import-jobs/"):
        if path.endswith("/import-errors"):
            return "/api/profile-bulk-import-jobs/{id}/import-errors"
        return "/api/profile-bulk-import-jobs/{id}"
    return path
