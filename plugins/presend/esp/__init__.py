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
    """Paces requests per route from the vendor's rate-limit headers, so the push keeps to the
    limit without meeting a 429.

    Vendors count requests in fixed windows per endpoint and say, on each response, how many
    requests the window has left and when it resets. The limiter spreads what is left evenly
    over the rest of the window, and after the last one waits for the reset. Klaviyo gives the
    reset as whole seconds from when it counted the request, so the reset is reckoned from
    when the request was sent, not from when its answer came back: counting from the answer
    would add the request's latency to every window (a 1-request/s limit would then get one
    request every 1 + latency seconds). The estimate can still be early by the time a
    request takes to reach the vendor (or by a second, should a vendor round the reset down):
    `margin` covers that, and doubles, up to the headers' one-second resolution, whenever a
    request meets a 429 anyway. The HTTP client retries the 429 itself after its Retry-After.
    Spacing at the advertised (per-minute, for Klaviyo) rate also keeps a client within a
    per-second burst limit the headers do not advertise.
    """

    def __init__(self, parse, margin: float = 0.02) -> None:
        self._parse = parse
        self._next: dict[str, float] = {}  # route -> monotonic time the next request may go
        self._margin: dict[str, float] = {}  # route -> learned safety margin at a reset
        self.base_margin = margin
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent pacing, for reports and tests
        self.throttled = 0  # 429s met despite pacing (each one widens the margin)

    def margin(self, route: str) -> float:
        return self._margin.get(route, self.base_margin)

    def observe(self, route: str, headers, sent_at: float, throttled: bool = False) -> None:
        """Note one response of `route` to a request sent at `sent_at` (monotonic)."""
        with self._lock:
            if throttled:
                self.throttled += 1
                self._margin[route] = min(2 * self.margin(route), MAX_MARGIN)
            parsed = self._parse(headers, sent_at)
            if parsed is None:
                self._next.pop(route, None)
                return
            remaining, reset_at = parsed
            if remaining <= 0:
                self._next[route] = reset_at + self.margin(route)
            else:
                # Even spacing: `remaining` requests fit before the reset.
                self._next[route] = sent_at + max(reset_at - sent_at, 0.0) / (remaining + 1)

    def wait(self, route: str) -> None:
        """Sleep until the route's next request may go."""
        with self._lock:
            until = self._next.get(route)
        if until is not None:
            delay = until - time.monotonic()
            if delay > 0:
                with self._lock:
                    self.waited += delay
                time.sleep(delay)


# The rate-limit headers count whole seconds: no margin beyond that is needed.
MAX_MARGIN = 1.0


def sendgrid_limits(headers, sent_at: float) -> tuple[int, float] | None:
    """SendGrid: X-RateLimit-Remaining and X-RateLimit-Reset (an epoch second): (remaining,
    monotonic time of the reset)."""
    remaining, reset = headers.get("X-RateLimit-Remaining"), headers.get("X-RateLimit-Reset")
    if remaining is None or reset is None:
        return None
    return int(remaining), time.monotonic() + float(reset) - time.time()


def klaviyo_limits(headers, sent_at: float) -> tuple[int, float] | None:
    """Klaviyo: RateLimit-Remaining and RateLimit-Reset (whole seconds until the window resets,
    counted when the vendor took the request): (remaining, monotonic time of the reset)."""
    remaining, reset = headers.get("RateLimit-Remaining"), headers.get("RateLimit-Reset")
    if remaining is None or reset is None:
        return None
    return int(remaining), sent_at + float(reset)


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
        """One request; waits first as the route's rate limit asks, then notes its headers."""
        self.limiter.wait(route)
        url = path if path.startswith("http") else self.base_url + path
        sent_at = time.monotonic()
        resp = self.http.request(method, url, **kwargs)
        retried = getattr(getattr(resp.raw, "retries", None), "history", ())
        if retried:
            # The answer is to a retry sent later than `sent_at`: reckon from the answer.
            sent_at = time.monotonic()
        throttled = any(h.status == 429 for h in retried)
        self.limiter.observe(route, resp.headers, sent_at, throttled)
        return resp
