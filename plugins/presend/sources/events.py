"""Behavioural events (product viewed, added to cart, email opened) from an analytics export
API with a cursor.

Events never change, but the analytics tool may receive them late: the stream looks back an
hour before its cursor, and the merge on the event id keeps that free of duplicates.
"""

from __future__ import annotations

from datetime import timedelta

from presend.sources.extract import CursorExportPaginator, Stream

CONN_ID = "presend_events"

EVENTS = Stream(
    name="events",
    conn_id=CONN_ID,
    endpoint="/api/v1/export/events",
    paginator=CursorExportPaginator(),
    records_key="data",
    cursor="occurred_at",
    cursor_path=["occurred_at"],
    page_size=5000,
    fields=("type", "product_id"),
    checks=(
        ("json_type(field_type) is distinct from 'VARCHAR'", "type missing or not a string"),
        (
            "coalesce(json_type(field_product_id), 'NULL') not in ('NULL', 'UBIGINT', 'BIGINT')",
            "product_id is not a number",
        ),
    ),
    lookback=timedelta(hours=1),
)
