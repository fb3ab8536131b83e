"""An ESP shaped like SendGrid Marketing Contacts, stateful, for the push stage and its tests.

Field definitions (reserved + custom, created by name), `PUT /v3/marketing/contacts` upserts
answered 202 with a job id, import job polling, and per-record errors (invalid email, field
too long). `/_sandbox/*` endpoints read back what the ESP holds.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MAX_CONTACTS_PER_REQUEST = 30_000
MAX_BODY_BYTES = 6_000_000
FIELD_MAX_LENGTH = {"email": 254, "first_name": 50, "last_name": 50}
CUSTOM_TEXT_MAX_LENGTH = 1000
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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class EspState:
    api_key: str
    state_file: Path | None = None
    contacts: dict[str, dict] = field(default_factory=dict)  # by email
    custom_fields: dict[str, dict] = field(default_factory=dict)  # by id
    jobs: dict[str, dict] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        if self.state_file and self.state_file.exists():
            doc = json.loads(self.state_file.read_text())
            self.contacts = doc["contacts"]
            self.custom_fields = doc["custom_fields"]

    def save(self) -> None:
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"contacts": self.contacts, "custom_fields": self.custom_fields})
            )
            tmp.replace(self.state_file)

    def upsert(self, job_id: str, records: list[dict]) -> None:
        """Apply an import job; records that fail validation are kept as the job's errors."""
        errors = []
        created = updated = 0
        names = {fid: f["name"] for fid, f in self.custom_fields.items()}
        for rec in records:
            problem = _validate(rec, names)
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
        job.update(status="completed", finished_at=_now())
        job["results"].update(
            created_count=created, updated_count=updated, errored_count=len(errors)
        )
        job["errors"] = errors
        if errors:
            job["results"]["errors_url"] = f"/_sandbox/jobs/{job_id}/errors"


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


def create_app(api_key: str = "sandbox-esp-key", state_file: Path | None = None) -> FastAPI:
    """The ESP app; `app.state.esp` holds its state for tests."""
    app = FastAPI(title="presend sandbox ESP (SendGrid Marketing Contacts shape)")
    state = EspState(api_key=api_key, state_file=state_file)
    state.load()
    app.state.esp = state

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if not path.startswith("/_sandbox"):
            state.requests[f"{request.method} {_route_name(path)}"] += 1
            if request.headers.get("authorization") != f"Bearer {state.api_key}":
                return JSONResponse(
                    {"errors": [{"field": None, "message": "authorization required"}]},
                    status_code=401,
                )
        return await call_next(request)

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
            return JSONResponse({"errors": [{"field": "name", "message": "invalid"}]}, 400)
        with state.lock:
            if name in RESERVED or any(f["name"] == name for f in state.custom_fields.values()):
                return JSONResponse(
                    {"errors": [{"field": "name", "message": "field name already exists"}]}, 400
                )
            fid = f"e{len(state.custom_fields) + 1}_{field_type[0]}"
            state.custom_fields[fid] = {"id": fid, "name": name, "field_type": field_type}
            state.save()
        return state.custom_fields[fid]

    @app.put("/v3/marketing/contacts")
    async def upsert(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return JSONResponse({"errors": [{"field": None, "message": "body too large"}]}, 413)
        body = json.loads(raw)
        contacts = body.get("contacts") or []
        if not 1 <= len(contacts) <= MAX_CONTACTS_PER_REQUEST:
            return JSONResponse(
                {"errors": [{"field": "contacts", "message": "1 to 30000 contacts"}]}, 400
            )
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
            if job is None:
                return JSONResponse({"errors": [{"field": "id", "message": "not found"}]}, 404)
            # Like the vendor, a job is still pending at the first look.
            if job["status"] == "pending" and job.pop("_seen", False):
                state.upsert(job_id, job.pop("_records"))
                state.save()
            elif job["status"] == "pending":
                job["_seen"] = True
            return {k: v for k, v in job.items() if not k.startswith("_") and k != "errors"}

    @app.get("/_sandbox/jobs/{job_id}/errors")
    def job_errors(job_id: str):
        return state.jobs[job_id].get("errors", [])

    @app.get("/_sandbox/contacts")
    def held_contacts():
        return state.contacts

    @app.post("/_sandbox/unsubscribe")
    async def unsubscribe(request: Request):
        email = (await request.json())["email"]
        with state.lock:
            state.contacts[email]["subscribed"] = False
            state.save()
        return state.contacts[email]

    @app.get("/_sandbox/requests")
    def request_counts():
        return dict(state.requests)

    return app


def _route_name(path: str) -> str:
    if path.startswith("/v3/marketing/contacts/imports/"):
        return "/v3/marketing/contacts/imports/{id}"
    return path
