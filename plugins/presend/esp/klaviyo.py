"""Klaviyo bulk profile import: `POST /api/profile-bulk-import-jobs`, job polling, import errors.

Profiles are matched by email. The import merges the properties it is given, so a record
carries only the changed ones; cleared merge fields are removed with
`meta.patch_properties.unset`. The import body has no subscription fields (those are separate
endpoints presend never calls): a push cannot re-subscribe anyone.
"""

from __future__ import annotations

import json
import re
import time

from presend.esp import (
    BatchOutcome,
    Change,
    EspError,
    JobNotFound,
    Rejection,
    VendorClient,
    klaviyo_limits,
    text,
)

REVISION = "2026-07-15"
JSON_API = "application/vnd.api+json"
# Merge fields Klaviyo has a profile attribute for; every other one is a custom property.
ATTRIBUTES = {"FIRST_NAME": "first_name"}
# Import-error codes that sending the same values again cannot fix.
PERMANENT_CODES = frozenset({"invalid"})
JOBS = "/api/profile-bulk-import-jobs"
JOB = "/api/profile-bulk-import-jobs/{id}"
ERRORS = "/api/profile-bulk-import-jobs/{id}/import-errors"
POINTER = re.compile(r"^/data/attributes/profiles/data/(\d+)")


class Klaviyo:
    name = "klaviyo"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_batch_contacts: int = 10_000,
        max_batch_bytes: int = 5_000_000,
        poll_interval: float = 0.2,
        job_timeout: float = 600,
    ) -> None:
        headers = {
            "Authorization": f"Klaviyo-API-Key {api_key}",
            "revision": REVISION,
            "Accept": JSON_API,
        }
        self.client = VendorClient(base_url, headers, klaviyo_limits)
        self.http = self.client.http
        self.max_batch_contacts = min(max_batch_contacts, 10_000)
        self.max_batch_bytes = min(max_batch_bytes, 5_000_000)
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout

    def _call(self, method: str, path: str, route: str, **kwargs) -> dict:
        resp = self.client.call(method, path, route, **kwargs)
        if resp.status_code == 404 and route in (JOB, ERRORS):
            raise JobNotFound(f"{method} {path}: the ESP does not know this import job")
        if resp.status_code >= 400:
            raise EspError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def prepare(self, merge_fields: list[str]) -> None:
        """Nothing to do: Klaviyo profile properties need no definition."""

    def record(self, change: Change) -> dict:
        attributes: dict = {"email": change.email}
        properties, unset = {}, []
        for name, value in change.values.items():
            if name == "EMAIL":
                continue  # the identifier, always present
            if name in ATTRIBUTES:
                attributes[ATTRIBUTES[name]] = None if value is None else text(value)
            elif value is None:
                unset.append(name)
            else:
                properties[name] = text(value)
        if properties:
            attributes["properties"] = properties
        rec: dict = {"type": "profile", "attributes": attributes}
        if unset:
            rec["meta"] = {"patch_properties": {"unset": unset}}
        return rec

    def body(self, records: list[dict]) -> bytes:
        doc = {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": records}},
            }
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    envelope = (
        b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":[',
        b"]}}}}",
    )

    def submit(self, batch: list[tuple[str, dict]], body: bytes | None = None) -> str:
        return self._call(
            "POST",
            JOBS,
            JOBS,
            data=body or self.body([rec for _, rec in batch]),
            headers={"Content-Type": JSON_API},
        )["data"]["id"]

    def collect(self, job_id: str, batch: list[tuple[str, dict]]) -> BatchOutcome:
        job = self._wait(job_id)
        outcome = BatchOutcome()
        rejected: set[str] = set()
        if job["attributes"].get("failed_count"):
            by_email = {rec["attributes"]["email"].strip().lower(): cid for cid, rec in batch}
            for err in self._errors(job_id):
                attrs = err["attributes"]
                match = POINTER.match((attrs.get("source") or {}).get("pointer") or "")
                if match and int(match.group(1)) < len(batch):
                    cid = batch[int(match.group(1))][0]
                else:
                    payload = attrs.get("original_payload") or {}
                    cid = by_email.get(str(payload.get("email", "")).strip().lower())
                if cid is None or cid in rejected:
                    continue
                reason = f"{attrs.get('title', 'rejected')}: {attrs.get('detail', '')}".strip()
                outcome.rejected.append(Rejection(cid, reason, attrs["code"] in PERMANENT_CODES))
                rejected.add(cid)
        outcome.acknowledged = [cid for cid, _ in batch if cid not in rejected]
        return outcome

    def _errors(self, job_id: str) -> list[dict]:
        out: list[dict] = []
        url: str | None = ERRORS.format(id=job_id) + "?page[size]=100"
        while url:
            page = self._call("GET", url, ERRORS)
            out += page["data"]
            url = (page.get("links") or {}).get("next")
        return out

    def _wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + self.job_timeout
        delay = self.poll_interval
        while True:
            job = self._call("GET", JOB.format(id=job_id), JOB)["data"]
            status = job["attributes"]["status"]
            if status == "complete":
                return job
            if status == "cancelled":
                raise EspError(f"import job {job_id} was cancelled")
            if time.monotonic() > deadline:
                raise EspError(f"import job {job_id} still {status} after timeout")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
