"""CRM contacts from a HubSpot CRM v3-shaped search API.

Incremental on `lastmodifieddate` with an inclusive (GTE) cursor: records sharing the cursor's
timestamp are fetched again and merged on the primary key downstream, so none is lost. HubSpot
caps one search query at 10,000 results; past that we restart the query from the newest
timestamp seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from presend import http, landing

STREAM = "crm_contacts"
PAGE_SIZE = 200
SEARCH_RESULT_CAP = 10_000
PROPERTIES = [
    "email",
    "firstname",
    "lastname",
    "hs_marketable_status",
    "loyalty_tier",
    "time_zone",
    "createdate",
    "lastmodifieddate",
]


@dataclass
class CrmConnection:
    base_url: str
    token: str

    @classmethod
    def from_airflow(cls, conn_id: str) -> CrmConnection:
        """Base URL and private-app token from an Airflow Connection."""
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        scheme = conn.schema or "https"
        port = f":{conn.port}" if conn.port else ""
        return cls(base_url=f"{scheme}://{conn.host}{port}", token=conn.password or "")


@dataclass
class ExtractResult:
    stream: str
    folder: str
    files: list[str]
    records: int
    pages: int

    def to_dict(self) -> dict:
        return asdict(self)


def _to_millis(iso: str) -> str:
    ts = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return str(int(ts.timestamp() * 1000))


def extract_contacts(conn: CrmConnection, cursor: str | None, run_id: str) -> ExtractResult:
    """Fetch contacts modified at or after `cursor` (ISO timestamp) into the landing zone."""
    folder = landing.run_dir(STREAM, run_id)
    client = http.session(headers={"Authorization": f"Bearer {conn.token}"})
    url = f"{conn.base_url}/crm/v3/objects/contacts/search"
    since, after = cursor, 0
    files, records = [], 0
    while True:
        body: dict = {
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
            "properties": PROPERTIES,
            "limit": min(PAGE_SIZE, SEARCH_RESULT_CAP - after),
            "after": str(after),
        }
        if since:
            body["filterGroups"] = [
                {
                    "filters": [
                        {
                            "propertyName": "lastmodifieddate",
                            "operator": "GTE",
                            "value": _to_millis(since),
                        }
                    ]
                }
            ]
        resp = client.post(url, json=body)
        resp.raise_for_status()
        page = resp.json()
        results = page.get("results", [])
        files.append(str(landing.write_page(folder, len(files) + 1, resp.content)))
        records += len(results)
        nxt = (page.get("paging") or {}).get("next", {}).get("after")
        if nxt is None:
            break
        after = int(nxt)
        if after >= SEARCH_RESULT_CAP:
            newest = results[-1]["properties"]["lastmodifieddate"]
            if newest == since:
                raise RuntimeError(
                    f"more than {SEARCH_RESULT_CAP} contacts share lastmodifieddate {since}: "
                    "the search API cannot page through them"
                )
            since, after = newest, 0
    return ExtractResult(STREAM, str(folder), files, records, len(files))
