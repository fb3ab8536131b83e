"""The one HTTP client every connector and ESP adapter uses.

requests + urllib3's Retry: exponential backoff on 429 and 5xx that honours `Retry-After`,
connection pooling, and a timeout on every call.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

DEFAULT_TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
RETRY_STATUSES = (429, 500, 502, 503, 504)


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
) -> requests.Session:
    """A pooled session that retries transient failures (POST and PUT included)."""
    retry = Retry(
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
    return s
