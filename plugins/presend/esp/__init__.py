"""ESP adapters: one interface, one module per vendor.

An adapter turns merge-field changes into the vendor's request bodies, submits a batch as the
vendor's asynchronous import job, and collects the job's outcome. `presend.push` decides what
to send and keeps the ledger; adapters never touch the warehouse.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

# Columns of esp_merge_fields that are not merge fields.
NOT_MERGE_FIELDS = frozenset({"contact_id", "fields_hash"})
VENDORS = ("sendgrid", "klaviyo")
# Airflow Connection per vendor: a deployment can hold both and switch with `esp.vendor`.
CONN_IDS = {"sendgrid": "presend_esp", "klaviyo": "presend_klaviyo"}


class EspError(RuntimeError):
    """The ESP refused a request, or an import job failed as a whole."""


class JobNotFound(EspError):
    """The ESP no longer knows an import job (expired): its contacts must be sent again."""


@dataclass
class Rejection:
    contact_id: str
    reason: str
    permanent: bool


@dataclass
class BatchOutcome:
    """What the ESP acknowledged of one batch; everything else was rejected."""

    acknowledged: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class Change:
    """One contact's update: `values` maps merge field -> new value, None clears it."""

    contact_id: str
    email: str
    values: dict[str, str | None]


class EspAdapter(Protocol):
    """Upserts merge fields for contacts; never touches subscription status."""

    name: str
    max_batch_contacts: int
    max_batch_bytes: int

    def prepare(self, merge_fields: list[str]) -> None:
        """Make sure the ESP knows every merge field (create or map custom fields)."""

    def record(self, change: Change) -> dict:
        """The vendor's JSON record for one contact's change."""

    # The request body around the records: prefix + comma-joined compact records + suffix.
    envelope: tuple[bytes, bytes]

    def body(self, records: list[dict]) -> bytes:
        """The request body that carries `records` (compact JSON, as sent on the wire)."""

    def submit(self, batch: list[tuple[str, dict]], body: bytes | None = None) -> str:
        """Start the vendor's import job for (contact_id, record) pairs; return its id.

        `body` is the same request already serialised (see `envelope`)."""

    def collect(self, job_id: str, batch: list[tuple[str, dict]]) -> BatchOutcome:
        """Wait for the job and return what the ESP acknowledged and rejected."""


def text(value) -> str:
    """Merge fields go to the ESP as text: what the template renders, no float noise."""
    return "" if value is None else str(value)


class RateLimiter:
    """Waits before a request when the vendor's rate-limit headers say the bucket is empty.

    Buckets are per route (vendors limit per endpoint). `observe` reads the headers of every
    response; `wait` sleeps until the bucket resets. A 429 with Retry-After is retried by the
    HTTP client itself; this keeps us from hitting it in the first place.
    """

    def __init__(self, parse) -> None:
        self._parse = parse
        self._resets: dict[str, float] = {}  # route -> monotonic time the bucket refills
        self._lock = threading.Lock()
        self.waited = 0.0

    def observe(self, route: str, headers) -> None:
        parsed = self._parse(headers)
        if parsed is None:
            return
        remaining, reset_in = parsed
        with self._lock:
            if remaining <= 0:
                self._resets[route] = time.monotonic() + max(reset_in, 0.0)
            else:
                self._resets.pop(route, None)

    def wait(self, route: str) -> None:
        with self._lock:
            until = self._resets.pop(route, None)
        if until is not None:
            delay = until - time.monotonic()
            if delay > 0:
                self.waited += delay
                time.sleep(delay)


def sendgrid_limits(headers) -> tuple[int, float] | None:
    """SendGrid: X-RateLimit-Remaining and X-RateLimit-Reset (epoch seconds)."""
    remaining, reset = headers.get("X-RateLimit-Remaining"), headers.get("X-RateLimit-Reset")
    if remaining is None or reset is None:
        return None
    return int(remaining), float(reset) - time.time()


def klaviyo_limits(headers) -> tuple[int, float] | None:
    """Klaviyo: RateLimit-Remaining and RateLimit-Reset (seconds until the window resets)."""
    remaining, reset = headers.get("RateLimit-Remaining"), headers.get("RateLimit-Reset")
    if remaining is None or reset is None:
        return None
    return int(remaining), float(reset)


def make_adapter(vendor: str, base_url: str, secret: str, **kwargs) -> EspAdapter:
    """The adapter for `vendor` at `base_url`."""
    if vendor == "sendgrid":
        from presend.esp.sendgrid import SendGrid

        return SendGrid(base_url, secret, **kwargs)
    if vendor == "klaviyo":
        from presend.esp.klaviyo import Klaviyo

        return Klaviyo(base_url, secret, **kwargs)
    raise ValueError(f"unknown ESP vendor {vendor!r}; expected one of {', '.join(VENDORS)}")


def from_airflow(vendor: str, conn_id: str | None = None, **kwargs) -> EspAdapter:
    """The adapter with base URL and API key from an Airflow Connection (password = key)."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id or CONN_IDS[vendor])
    port = f":{conn.port}" if conn.port else ""
    base_url = f"{conn.schema or 'https'}://{conn.host}{port}"
    return make_adapter(vendor, base_url, conn.password or "", **kwargs)


class VendorClient:
    """The shared HTTP session (presend.http) plus the vendor's rate-limit buckets."""

    def __init__(self, base_url: str, headers: dict[str, str], parse_limits) -> None:
        from presend import http

        self.base_url = base_url.rstrip("/")
        self.http = http.session(headers=headers)
        self.limiter = RateLimiter(parse_limits)

    def call(self, method: str, path: str, route: str, **kwargs):
        """One request; waits first when the route's bucket is empty, then notes its headers."""
        self.limiter.wait(route)
        url = path if path.startswith("http") else self.base_url + path
        resp = self.http.request(method, url, **kwargs)
        self.limiter.observe(route, resp.headers)
        return resp
