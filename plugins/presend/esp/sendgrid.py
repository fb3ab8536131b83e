"""SendGrid Marketing Contacts: custom fields by name, `PUT /v3/marketing/contacts`, job polling."""

from __future__ import annotations

import json
import time
from urllib.parse import urljoin

from presend import http
from presend.esp import BatchOutcome, Rejection

# Merge fields SendGrid has a reserved field for; every other one becomes a custom field.
RESERVED = {"EMAIL": "email", "FIRST_NAME": "first_name"}
NOT_MERGE_FIELDS = {"contact_id", "fields_hash"}
PERMANENT_REASONS = ("invalid email", "longer than")


class SendGridError(RuntimeError):
    """SendGrid refused a request or an import job failed as a whole."""


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
        self.base_url = base_url.rstrip("/")
        self.http = http.session(headers={"Authorization": f"Bearer {api_key}"})
        self.max_batch_contacts = max_batch_contacts
        self.max_batch_bytes = max_batch_bytes
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.field_ids: dict[str, str] = {}

    @classmethod
    def from_airflow(cls, conn_id: str, **kwargs) -> SendGrid:
        """Base URL and API key from an Airflow Connection (password = API key)."""
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        port = f":{conn.port}" if conn.port else ""
        return cls(f"{conn.schema or 'https'}://{conn.host}{port}", conn.password or "", **kwargs)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        resp = self.http.request(method, urljoin(self.base_url + "/", path.lstrip("/")), **kwargs)
        if resp.status_code >= 400:
            raise SendGridError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def prepare(self, merge_fields: list[str]) -> None:
        wanted = [f for f in merge_fields if f not in RESERVED and f not in NOT_MERGE_FIELDS]
        existing = {
            f["name"]: f["id"]
            for f in self._call("GET", "/v3/marketing/field_definitions")["custom_fields"]
        }
        for name in wanted:
            if name not in existing:
                created = self._call(
                    "POST",
                    "/v3/marketing/field_definitions",
                    json={"name": name, "field_type": "Text"},
                )
                existing[name] = created["id"]
        self.field_ids = {name: existing[name] for name in wanted}

    def record(self, row: dict) -> dict:
        rec = {vendor: row[field] for field, vendor in RESERVED.items()}
        rec["custom_fields"] = {fid: _text(row[name]) for name, fid in self.field_ids.items()}
        return rec

    def send(self, batch: list[tuple[str, dict]]) -> BatchOutcome:
        # Compact JSON: push.batches() sizes batches by compact bytes, so the body on the
        # wire must be serialised the same way to stay within max_batch_bytes.
        body = json.dumps({"contacts": [rec for _, rec in batch]}, separators=(",", ":"))
        job_id = self._call(
            "PUT",
            "/v3/marketing/contacts",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )["job_id"]
        job = self._wait(job_id)
        by_email = {rec["email"]: cid for cid, rec in batch}
        outcome = BatchOutcome()
        rejected: set[str] = set()
        if job["results"].get("errored_count"):
            for err in self._call("GET", job["results"]["errors_url"]):
                cid = by_email.get(err.get("email"))
                if cid is None:
                    continue
                reason = err.get("message", "rejected")
                permanent = any(p in reason for p in PERMANENT_REASONS)
                outcome.rejected.append(Rejection(cid, reason, permanent))
                rejected.add(cid)
        outcome.acknowledged = [cid for cid, _ in batch if cid not in rejected]
        return outcome

    def _wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + self.job_timeout
        delay = self.poll_interval
        while True:
            job = self._call("GET", f"/v3/marketing/contacts/imports/{job_id}")
            if job["status"] in ("completed", "errored"):
                return job
            if job["status"] == "failed":
                raise SendGridError(f"import job {job_id} failed")
            if time.monotonic() > deadline:
                raise SendGridError(f"import job {job_id} still {job['status']} after timeout")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _text(value) -> str:
    return "" if value is None else str(value)
