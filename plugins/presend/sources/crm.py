"""CRM contacts from a HubSpot CRM v3-shaped search API.

Incremental on `lastmodifieddate` with an inclusive (GTE) cursor: records sharing the cursor's
timestamp are fetched again and merged on the primary key downstream, so none is lost. HubSpot
caps one search query at 10,000 results; past that the query restarts from the newest timestamp
seen (see `SearchPaginator`).
"""

from __future__ import annotations

from presend.sources.extract import (
    Column,
    ExtractResult,
    SearchPaginator,
    SourceConnection,
    Stream,
    extract,
)

STREAM = "crm_contacts"
CONN_ID = "presend_crm"
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

CONTACTS = Stream(
    name=STREAM,
    conn_id=CONN_ID,
    endpoint="/crm/v3/objects/contacts/search",
    paginator=SearchPaginator(tuple(PROPERTIES), result_cap=SEARCH_RESULT_CAP),
    records_key="results",
    cursor="lastmodifieddate",
    cursor_path=["properties", "lastmodifieddate"],
    page_size=PAGE_SIZE,
    columns=(
        Column("archived", "boolean", "try_cast(rec ->> 'archived' as boolean)"),
        Column("properties", "json", "rec -> 'properties'"),
    ),
    checks=(
        ("json_type(properties) is distinct from 'OBJECT'", "properties is not a JSON object"),
    ),
)

CrmConnection = SourceConnection  # kept: the name fixtures and callers know


def extract_contacts(conn: SourceConnection, cursor: str | None, run_id: str) -> ExtractResult:
    """Fetch contacts modified at or after `cursor` (ISO timestamp) into the landing zone."""
    return extract(CONTACTS, conn, cursor, run_id)
