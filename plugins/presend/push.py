"""The push stage: send new and changed merge fields to the ESP, in full batches.

`push_ledger` keeps, per ESP and contact, the last `fields_hash` the ESP acknowledged. Only
rows whose hash differs are sent, and the ledger moves batch by batch, only on
acknowledgement: a rerun after a crash sends only what was not acknowledged. Records the ESP
rejects are kept in `push_rejects` with its reason; a permanent rejection is not retried for
the same values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import duckdb

from presend import warehouse
from presend.esp import EspAdapter

log = logging.getLogger(__name__)

SCHEMA_SQL = """
create table if not exists push_ledger (
    esp varchar not null,
    contact_id varchar not null,
    fields_hash varchar not null,
    acknowledged_at timestamp not null,
    primary key (esp, contact_id)
);
create table if not exists push_rejects (
    esp varchar not null,
    contact_id varchar not null,
    fields_hash varchar not null,
    reason varchar not null,
    permanent boolean not null,
    rejected_at timestamp not null
);
"""

PENDING_SQL = """
select m.*
from esp_merge_fields as m
left join push_ledger as l
    on l.esp = $esp and l.contact_id = m.contact_id
where l.fields_hash is distinct from m.fields_hash
    and not exists (
        select 1 from push_rejects as r
        where r.esp = $esp and r.contact_id = m.contact_id
            and r.fields_hash = m.fields_hash and r.permanent
    )
order by m.contact_id
"""

ENVELOPE_BYTES = 64  # the request body around the records


@dataclass
class PushResult:
    esp: str
    candidates: int = 0
    pushed: int = 0
    skipped: int = 0
    rejected: int = 0
    batches: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def batches(
    records: list[tuple[str, dict]], max_count: int, max_bytes: int
) -> Iterator[list[tuple[str, dict]]]:
    """Fill batches up to the vendor's limits by count and by JSON bytes."""
    batch: list[tuple[str, dict]] = []
    size = ENVELOPE_BYTES
    for cid, rec in records:
        rec_bytes = len(json.dumps(rec, separators=(",", ":")).encode()) + 1
        if batch and (len(batch) >= max_count or size + rec_bytes > max_bytes):
            yield batch
            batch, size = [], ENVELOPE_BYTES
        batch.append((cid, rec))
        size += rec_bytes
    if batch:
        yield batch


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def push(adapter: EspAdapter) -> PushResult:
    """Push what changed since the ESP's last acknowledgement; move the ledger per batch."""
    result = PushResult(esp=adapter.name)
    with warehouse.connect() as con:
        ensure_schema(con)
        total = con.execute("select count(*) from esp_merge_fields").fetchone()[0]
        cur = con.execute(PENDING_SQL, {"esp": adapter.name})
        columns = [d[0] for d in cur.description]
        rows = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
        result.candidates = total
        result.skipped = total - len(rows)
        if not rows:
            return result
        adapter.prepare(columns)
        hashes = {r["contact_id"]: r["fields_hash"] for r in rows}
        records = [(r["contact_id"], adapter.record(r)) for r in rows]
        for batch in batches(records, adapter.max_batch_contacts, adapter.max_batch_bytes):
            outcome = adapter.send(batch)
            con.execute("begin")
            acked = outcome.acknowledged
            # One set-based statement per batch: executemany would go row by row.
            con.execute(
                "insert into push_ledger select $esp, unnest($ids::varchar[]), "
                "unnest($hashes::varchar[]), now()::timestamp "
                "on conflict (esp, contact_id) do update set "
                "fields_hash = excluded.fields_hash, acknowledged_at = excluded.acknowledged_at",
                {"esp": adapter.name, "ids": acked, "hashes": [hashes[c] for c in acked]},
            )
            if outcome.rejected:
                con.executemany(
                    "insert into push_rejects values (?, ?, ?, ?, ?, now()::timestamp)",
                    [
                        (adapter.name, r.contact_id, hashes[r.contact_id], r.reason, r.permanent)
                        for r in outcome.rejected
                    ],
                )
            con.execute("commit")
            result.batches += 1
            result.pushed += len(outcome.acknowledged)
            result.rejected += len(outcome.rejected)
            log.info(
                "batch %d: %d acknowledged, %d rejected",
                result.batches,
                len(outcome.acknowledged),
                len(outcome.rejected),
            )
    return result
