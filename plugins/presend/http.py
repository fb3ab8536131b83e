"""The one HTTP client every connector and ESP adapter uses.

requests + urllib3's Retry: exponential backoff on 429 and 5xx that honours `Retry-After`
(also Shopify's fractional `Retry-After: 2.0`), retries of read timeouts, connection pooling, a
timeout on every call, and pacing from the vendor's rate-limit headers so a client slows down
before the vendor answers 429.
"""

from __future__ import annotations

import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

DEFAULT_TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
RETRY_STATUSES = (429, 500, 502, 503, 504)


class _Retry(Retry):
    def parse_retry_after(self, retry_after: str) -> float:
        # urllib3 accepts whole seconds or an HTTP date; Shopify sends "2.0".
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            return super().parse_retry_after(retry_after)


class RateLimitPacer:
    """A response hook that waits before the next call when the vendor's bucket is nearly full.

    Reads Shopify's `X-Shopify-Shop-Api-Call-Limit: used/size` (a leaky bucket draining at
    `leak_per_second`) and the common `X-RateLimit-Remaining` / `X-RateLimit-Reset` pair.
    """

    def __init__(self, leak_per_second: float = 2.0, headroom: float = 0.8) -> None:
        self.leak_per_second = leak_per_second
        self.headroom = headroom
        self.waited = 0.0  # seconds spent pacing, for reports and tests
        self._lock = threading.Lock()

    def delay(self, headers) -> float:
        """Seconds to wait before the next call, from one response's headers."""
        call_limit = headers.get("X-Shopify-Shop-Api-Call-Limit")
        if call_limit and "/" in call_limit:
            used, size = (float(x) for x in call_limit.split("/", 1))
            over = used - self.headroom * size
            return max(0.0, (over + 1) / self.leak_per_second) if over >= 0 else 0.0
        remaining = headers.get("X-RateLimit-Remaining")
        if remaining is not None and remaining.strip() == "0":
            try:
                return max(0.0, float(headers.get("X-RateLimit-Reset", "1")))
            except ValueError:
                return 1.0
        return 0.0

    def __call__(self, resp: requests.Response, *args, **kwargs) -> requests.Response:
        wait = self.delay(resp.headers)
        if wait:
            with self._lock:
                self.waited += wait
            time.sleep(wait)
        return resp


class _TimeoutSession(requests.Session):
    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, **kwargs)


def session(
    *,
    retries: int = 5,
    backoff_factor: float = 0.5,
    backoff_max: float = 30.0,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    headers: dict[str, str] | None = None,
    pacer: RateLimitPacer | None = None,
) -> requests.Session:
    """A pooled session that retries transient failures (POST and PUT included).

    With `pacer`, it also waits between calls as the vendor's rate-limit headers ask.
    """
    retry = _Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff_factor,
        backoff_max=backoff_max,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # our writes are idempotent upserts: retry every method
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    s = _TimeoutSession(timeout)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=16)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = "presend/0.1"
    if headers:
        s.headers.update(headers)
    if pacer is not None:
        s.hooks["response"].append(pacer)
    return s
