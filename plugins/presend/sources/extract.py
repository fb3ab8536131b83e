"""The one extractor: a declarative `Stream` (endpoint, paginator, cursor, primary key) is
fetched page by page from its cursor into the landing zone, bodies as they came over the wire.

Cursors are inclusive (records sharing the cursor's value are fetched again and merged on the
primary key downstream), and a stream may look back further than its cursor to pick up records
that arrive late.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import urlsplit

import requests

from presend import http, landing

log = logging.getLogger(__name__)


@dataclass
class SourceConnection:
    """Base URL and token of a source API."""

    base_url: str
    token: str

    @classmethod
    def from_airflow(cls, conn_id: str) -> SourceConnection:
        """Base URL and token (the password field) from an Airflow Connection."""
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        scheme = conn.schema or "https"
        port = f":{conn.port}" if conn.port else ""
        return cls(base_url=f"{scheme}://{conn.host}{port}", token=conn.password or "")


@dataclass(frozen=True)
class Page:
    body: bytes
    records: int


class Paginator(Protocol):
    def pages(
        self, client: requests.Session, url: str, stream: Stream, since: str | None
    ) -> Iterator[Page]: ...


@dataclass(frozen=True)
class Column:
    """A raw-table column beside id and cursor: its type and its SQL over the record `rec`."""

    name: str
    type: str
    sql: str


@dataclass(frozen=True)
class Stream:
    """One source stream, declared: where it is, how it pages, and how it lands in raw."""

    name: str  # also the raw table: raw.<name>
    conn_id: str
    endpoint: str
    paginator: Paginator
    records_key: str  # the key of the page body that holds the records
    cursor: str  # raw column holding the cursor (a UTC timestamp)
    cursor_path: list[str]  # where the cursor is in a record
    primary_key: str = "id"
    page_size: int = 100
    params: dict = field(default_factory=dict)
    auth: Callable[[str], dict[str, str]] = lambda token: {"Authorization": f"Bearer {token}"}
    columns: tuple[Column, ...] = (Column("record", "json", "rec"),)
    # Top-level fields the checks read, as JSON columns `field_<name>` (parsed once).
    fields: tuple[str, ...] = ()
    # (SQL condition over the parsed row, reason): a record meeting it goes to raw.rejects.
    checks: tuple[tuple[str, str], ...] = ()
    lookback: timedelta = timedelta(0)
    leak_per_second: float | None = None  # the vendor's call-limit bucket drain rate, if any
    timeout: tuple[float, float] = http.DEFAULT_TIMEOUT
    retries: int = 5

    def cursor_of(self, record: dict) -> str | None:
        value = record
        for key in self.cursor_path:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, str) else None


@dataclass
class ExtractResult:
    stream: str
    folder: str
    files: list[str]
    records: int
    pages: int
    since: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_time(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def iso_z(ts: datetime) -> str:
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def lookback_for(stream: Stream) -> timedelta:
    """The stream's lookback; `PRESEND_LOOKBACK_SECONDS_<STREAM>` overrides it."""
    value = os.environ.get(f"PRESEND_LOOKBACK_SECONDS_{stream.name.upper()}")
    return timedelta(seconds=float(value)) if value else stream.lookback


def start_of(stream: Stream, cursor: str | None) -> str | None:
    """Where an extract starts: the committed cursor, less the stream's lookback."""
    if cursor is None:
        return None
    return iso_z(parse_time(cursor) - lookback_for(stream))


def extract(
    stream: Stream, conn: SourceConnection, cursor: str | None, run_id: str
) -> ExtractResult:
    """Fetch the stream's records at or after `cursor` (less the lookback) into the landing zone."""
    since = start_of(stream, cursor)
    landing.clean_orphans(stream.name)
    pacer = http.RateLimitPacer(stream.leak_per_second) if stream.leak_per_second else None
    client = http.session(
        headers=stream.auth(conn.token),
        pacer=pacer,
        timeout=stream.timeout,
        retries=stream.retries,
    )
    files, records = [], 0
    with client, landing.attempt(stream.name, run_id) as folder:
        url = f"{conn.base_url}{stream.endpoint}"
        for page in stream.paginator.pages(client, url, stream, since):
            files.append(str(landing.write_page(folder, len(files) + 1, page.body)))
            records += page.records
    # Counts only: records hold personal data and stay out of the logs.
    log.info("%s: %d records in %d pages since %s", stream.name, records, len(files), since)
    return ExtractResult(stream.name, str(folder), files, records, len(files), since)


def _checked(resp: requests.Response) -> requests.Response:
    if resp.status_code >= 400:
        # The vendor's error text says what is wrong (never a record): keep it in the error.
        raise requests.HTTPError(
            f"{resp.status_code} from {resp.request.method} {resp.url.split('?')[0]}: "
            f"{resp.text[:300]}",
            response=resp,
        )
    return resp


@dataclass(frozen=True)
class LinkHeaderPaginator:
    """Shopify-style: filters on the first call, then follow `Link: <…>; rel="next"`."""

    since_param: str = "updated_at_min"
    limit_param: str = "limit"

    def pages(self, client, url, stream, since):
        params = dict(stream.params) | {self.limit_param: stream.page_size}
        if since:
            params[self.since_param] = since
        resp = _checked(client.get(url, params=params))
        while True:
            body = resp.content
            yield Page(body, len(json.loads(body)[stream.records_key]))
            nxt = resp.links.get("next", {}).get("url")
            if not nxt:
                return
            if urlsplit(nxt).netloc != urlsplit(url).netloc:
                # The token goes with every call: never follow a link to another host.
                raise RuntimeError(f"{stream.name}: next page link leaves {urlsplit(url).netloc}")
            resp = _checked(client.get(nxt))


@dataclass(frozen=True)
class CursorExportPaginator:
    """An export API: `since` on the first call, then the body's opaque `next_cursor`."""

    since_param: str = "since"
    cursor_param: str = "cursor"
    next_key: str = "next_cursor"
    limit_param: str = "limit"

    def pages(self, client, url, stream, since):
        params = dict(stream.params) | {self.limit_param: stream.page_size}
        if since:
            params[self.since_param] = since
        while True:
            resp = _checked(client.get(url, params=params))
            body = resp.content
            page = json.loads(body)
            yield Page(body, len(page[stream.records_key]))
            nxt = page.get(self.next_key)
            if not nxt:
                return
            params = {self.cursor_param: nxt, self.limit_param: stream.page_size}


def _keys(stream: Stream, results: list) -> list[tuple[str, str]]:
    """(id, cursor) of the well-formed records of a page, in the order served."""
    out = []
    for r in results:
        cursor = stream.cursor_of(r) if isinstance(r, dict) else None
        if cursor and r.get("id") is not None:
            try:
                parse_time(cursor)
            except ValueError:
                continue  # the loader rejects it; paging must not steer by it
            out.append((r["id"], cursor))
    return out


@dataclass(frozen=True)
class SearchPaginator:
    """HubSpot CRM search: POST a GTE filter on the cursor, page with an `after` offset.

    A query is capped (HubSpot: 10,000 results); past the cap the query restarts from the
    newest cursor value seen. Offsets shift when records change while we page (a changed
    record moves to the end and the rest move up one place, so one would be skipped): each
    page after the first starts one record early, and when that record is not the previous
    page's last one, the query restarts from the last cursor value seen.
    """

    properties: tuple[str, ...]
    result_cap: int = 10_000

    def _body(self, stream: Stream, since: str | None, after: int, limit: int) -> dict:
        prop = stream.cursor_path[-1]
        body: dict = {
            "sorts": [{"propertyName": prop, "direction": "ASCENDING"}],
            "properties": list(self.properties),
            "limit": limit,
            "after": str(after),
        }
        if since:
            millis = str(int(parse_time(since).timestamp() * 1000))
            body["filterGroups"] = [
                {"filters": [{"propertyName": prop, "operator": "GTE", "value": millis}]}
            ]
        return body

    def pages(self, client, url, stream, since):
        after, last = 0, None  # last: (id, cursor) of the previous page's last record
        while True:
            start = after - 1 if last else after  # one record early: detects a shift
            limit = min(stream.page_size, self.result_cap - start)
            resp = _checked(client.post(url, json=self._body(stream, since, start, limit)))
            body = resp.content
            page = json.loads(body)
            results = page.get(stream.records_key, [])
            seen = _keys(stream, results)
            # The record repeated on purpose is not counted twice.
            yield Page(body, len(results) - (1 if last and last in seen else 0))
            if last and last not in seen:
                log.info("%s: records moved while paging; restarting from %s", stream.name, last[1])
                since, after, last = last[1], 0, None
                continue
            nxt = (page.get("paging") or {}).get("next", {}).get("after")
            if nxt is None:
                return
            newest = max((c for _, c in seen), key=parse_time, default=since)
            after, last = int(nxt), (seen[-1] if seen else None)
            if after >= self.result_cap:
                if since and parse_time(newest) == parse_time(since):
                    raise RuntimeError(
                        f"more than {self.result_cap} records share {stream.cursor} {since}: "
                        "the search API cannot page through them"
                    )
                since, after, last = newest, 0, None
