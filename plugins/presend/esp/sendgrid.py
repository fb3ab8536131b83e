"""SendGrid Marketing Contacts: custom fields by name, `PUT /v3/marketing/contacts`, job polling.

SendGrid's upsert is partial ("any fields omitted from the request will remain as they
were"), so a record carries only the fields that changed; an empty string clears a field.
The upsert has no subscription fields at all: a push cannot re-subscribe anyone.
"""

from __future__ import annotations

import json
import time

from presend.esp import (
    NOT_MERGE_FIELDS,
    BatchOutcome,
    Change,
    EspError,
    JobNotFound,
    Rejection,
    VendorClient,
    sendgrid_limits,
    text,
)

# Merge fields SendGrid has a reserved field for; every other one becomes a custom field.
RESERVED = {"EMAIL": "email", "FIRST_NAME": "first_name"}
# Per-record errors that sending the same values again cannot fix.
PERMANENT_REASONS = ("invalid email", "longer than", "unknown custom field")
CONTACTS = "/v3/marketing/contacts"
FIELDS = "/v3/marketing/field_definitions"
IMPORTS = "/v3/marketing/contacts/imports/{id}"


class SendGrid:
    name = "sendgrid"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_batch_contacts: int = 30_000,
        max_batch_bytes: int = 6_000_000,
        poll_interval: float = 0.2,
        job_timeout: float = 600,
    ) -> None:
        self.client = VendorClient(
            base_url, {"Authorization": f"Bearer {api_key}"}, sendgrid_limits
        )
        self.http = self.client.http
        self.max_batch_contacts = min(max_batch_contacts, 30_000)
        self.max_batch_bytes = min(max_batch_bytes, 6_000_000)
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.field_ids: dict[str, str] = {}

    def _call(self, method: str, path: str, route: str | None = None, **kwargs) -> dict | list:
        resp = self.client.call(method, path, route or path, **kwargs)
        if resp.status_code == 404 and route == IMPORTS:
            raise JobNotFound(f"{method} {path}: the ESP does not know this import job")
        if resp.status_code >= 400:
            raise EspError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def prepare(self, merge_fields: list[str]) -> None:
        wanted = [f for f in merge_fields if f not in RESERVED and f not in NOT_MERGE_FIELDS]
        # SendGrid field names are unique case-insensitively: map ours the same way.
        existing = {f["name"].lower(): f["id"] for f in self._call("GET", FIELDS)["custom_fields"]}
        for name in wanted:
            if name.lower() not in existing:
                created = self._call("POST", FIELDS, json={"name": name, "field_type": "Text"})
                existing[name.lower()] = created["id"]
        self.field_ids = {name: existing[name.lower()] for name in wanted}

    def record(self, change: Change) -> dict:
        rec: dict = {"email": change.email}
        custom = {}
        for name, value in change.values.items():
            if name == "EMAIL":
                continue  # the identifier, always present
            if name in RESERVED:
                rec[RESERVED[name]] = text(value)
            else:
                custom[self.field_ids[name]] = text(value)
        if custom:
            rec["custom_fields"] = custom
        return rec

    envelope = (b'{"contacts":[', b"]}")

    def body(self, records: list[dict]) -> bytes:
        return json.dumps({"contacts": records}, separators=(",", ":")).encode()

    def submit(self, batch: list[tuple[str, dict]], body: bytes | None = None) -> str:
        return self._call(
            "PUT",
            CONTACTS,
            data=body or self.body([rec for _, rec in batch]),
            headers={"Content-Type": "application/json"},
        )["job_id"]

    def collect(self, job_id: str, batch: list[tuple[str, dict]]) -> BatchOutcome:
        job = self._wait(job_id)
        by_email = {rec["email"].strip().lower(): cid for cid, rec in batch}
        outcome = BatchOutcome()
        rejected: set[str] = set()
        errors_url = job.get("results", {}).get("errors_url")
        if errors_url:
            for err in self._call("GET", errors_url, route="errors"):
                cid = by_email.get(str(err.get("email", "")).strip().lower())
                if cid is None or cid in rejected:
                    continue
                reason = err.get("message") or "rejected"
                permanent = any(p in reason for p in PERMANENT_REASONS)
                outcome.rejected.append(Rejection(cid, reason, permanent))
                rejected.add(cid)
        elif job["status"] == "failed":
            raise EspError(f"import job {job_id} failed without a list of errors")
        outcome.acknowledged = [cid for cid, _ in batch if cid not in rejected]
        return outcome

    def _wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + self.job_timeout
        delay = self.poll_interval
        while True:
            job = self._call("GET", IMPORTS.format(id=job_id), route=IMPORTS)
            if job["status"] in ("completed", "errored", "failed"):
                return job
            if time.monotonic() > deadline:
                raise EspError(f"import job {job_id} still {job['status']} after timeout")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
