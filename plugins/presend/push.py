"""The push stage: send new and changed merge fields to the ESP, in full batches.

`push_ledger` keeps, per ESP and contact, the last merge-field values (and `fields_hash`) the
ESP acknowledged. A run sends new contacts in full, changed contacts with only the fields that
changed, and clears the personalization fields of contacts that left `esp_merge_fields`
(consent withdrawn). Contacts the quality gate quarantined keep their previous values.

Exactly-once in effect: every submitted import job is written to `push_jobs` before it is
polled, and the ledger moves only when the job's outcome is known, in the same transaction
that forgets the job. A rerun after a crash first collects the jobs still outstanding, then
diffs again: an acknowledged contact is never sent twice. Records the ESP rejects land in
`push_rejects` with its reason; permanent rejections are not retried for the same values,
transient ones are retried on the next run (up to MAX_TRANSIENT_ATTEMPTS).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import duckdb

from presend import warehouse
from presend.esp import NOT_MERGE_FIELDS, BatchOutcome, Change, EspAdapter, JobNotFound

log = logging.getLogger(__name__)

SCHEMA_SQL = """
create table if not exists push_ledger (
    esp varchar not null,
    contact_id varchar not null,
    fields_hash varchar not null,
    acknowledged_at timestamp not null,
    email varchar,
    fields varchar,  -- JSON of every merge field as acknowledged (varchar: no parse per row)
    primary key (esp, contact_id)
);
alter table push_ledger add column if not exists email varchar;
alter table push_ledger add column if not exists fields varchar;
create table if not exists push_rejects (
    esp varchar not null,
    contact_id varchar not null,
    fields_hash varchar not null,
    reason varchar not null,
    permanent boolean not null,
    rejected_at timestamp not null
);
create table if not exists push_jobs (
    esp varchar not null,
    job_id varchar not null,
    batch varchar not null,  -- JSON: the entries of the batch, to collect it after a crash
    submitted_at timestamp not null,
    primary key (esp, job_id)
);
"""

ENVELOPE_BYTES = 64  # an upper bound of the request body around the records
MAX_JOBS_IN_FLIGHT = 3  # import jobs submitted and not yet collected, per push
MAX_TRANSIENT_ATTEMPTS = 5  # then a transiently rejected record waits for new values
CLEARED = "cleared"  # fields_hash of a clear: the contact left esp_merge_fields
OLD_EMAIL = "#old-email"  # suffix of the entry that clears a contact under its old email
# Merge fields whose values are personal data: masked in previews and never logged.
PII_MARKERS = ("EMAIL", "NAME", "PHONE")


class PushSafetyError(RuntimeError):
    """The push refuses to run: it would clear every contact the ESP holds."""


@dataclass
class PushResult:
    esp: str
    candidates: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    cleared: int = 0
    quarantined: int = 0
    given_up: int = 0
    pushed: int = 0
    skipped: int = 0
    rejected: int = 0
    batches: int = 0
    recovered_jobs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pending:
    """One contact to send: its new full values (None for a clear) and the change on the wire."""

    change: Change
    fields_hash: str
    kind: str  # new | changed | cleared
    values_json: str | None  # every merge field as the ledger keeps it; None for a clear
    previous: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What to send. `pending()` diffs lazily, so the first batch leaves before the last row
    is diffed (the diffing overlaps the waits on the vendor's rate limit)."""

    merge_fields: list[str]
    counts: dict[str, int]
    clears: list[Pending]
    held_fields: set[str]  # merge fields the ESP may hold values of (from the ledger)
    con: duckdb.DuckDBPyConnection
    rows_sql: str  # new and changed contacts with their ledger entries
    params: dict

    @property
    def to_send(self) -> int:
        return self.counts["new"] + self.counts["changed"] + self.counts["cleared"]

    def _rows(self) -> Iterator[tuple]:
        # A cursor of its own: rows stream in while the push's connection writes the ledger
        # (the cursor reads the snapshot taken when it started).
        cur = self.con.cursor()
        try:
            cur.execute(self.rows_sql, self.params)
            while chunk := cur.fetchmany(2000):
                yield from chunk
        finally:
            cur.close()

    def pending(self, unsent: list[Pending] | None = None) -> Iterator[Pending]:
        """New, changed and cleared contacts; ones whose values the ESP already holds (the
        hash moved, the values did not) go to `unsent` instead."""
        merge_fields = self.merge_fields
        email_at = merge_fields.index("EMAIL") if "EMAIL" in merge_fields else None
        for (
            cid,
            fields_hash,
            ledger_hash,
            ledger_fields,
            ledger_email,
            ledger_email_taken,
            values_json,
            *vals,
        ) in self._rows():
            values = dict(zip(merge_fields, vals, strict=True))
            held = json.loads(ledger_fields) if ledger_fields else None
            email = vals[email_at] if email_at is not None else ""
            if ledger_hash is None or held is None or ledger_email != email:
                # New to this ESP, or under a new email (a new ESP contact): every field.
                if held and ledger_email and not ledger_email_taken:
                    # The contact under its old email must not keep stale fields: clear it
                    # (its own entry; the ledger follows the new email).
                    old = {f: None for f in held if f != "EMAIL"}
                    old_change = Change(f"{cid}{OLD_EMAIL}", ledger_email, old)
                    yield Pending(old_change, CLEARED, "cleared", None, held)
                kind, diff, held = "new" if ledger_hash is None else "changed", values, {}
            else:
                kind = "changed"
                diff = {f: v for f, v in values.items() if held.get(f) != v}
                # A merge field dropped from the model must not stay stale in the ESP.
                diff |= {f: None for f in held if f not in values}
            item = Pending(Change(cid, email, diff), fields_hash, kind, values_json, held)
            if diff:
                yield item
            elif unsent is not None:
                unsent.append(item)
        yield from self.clears


def batches(
    records: list[tuple[str, dict]],
    max_count: int,
    max_bytes: int,
    envelope: int = ENVELOPE_BYTES,
) -> Iterator[list[tuple[str, dict]]]:
    """Fill batches up to the vendor's limits by count and by JSON bytes."""
    encoded = [(i, _encode(rec)) for i, (_, rec) in enumerate(records)]
    for batch in _fill(encoded, max_count, max_bytes, envelope):
        yield [records[i] for i, _ in batch]


def _encode(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _fill(
    encoded: list[tuple], max_count: int, max_bytes: int, envelope: int
) -> Iterator[list[tuple]]:
    """Batches of (key, record bytes) within max_count records and max_bytes of body."""
    batch: list[tuple] = []
    size = envelope
    for item in encoded:
        rec_bytes = len(item[1]) + 1  # and a comma
        if batch and (len(batch) >= max_count or size + rec_bytes > max_bytes):
            yield batch
            batch, size = [], envelope
        batch.append(item)
        size += rec_bytes
    if batch:
        yield batch


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute(
            "select count(*) from information_schema.tables where table_name = ?", [name]
        ).fetchone()[0]
    )


def plan(
    con: duckdb.DuckDBPyConnection, esp: str, audience: tuple[str, dict] | None = None
) -> Plan:
    """What a push would send now: new, changed and cleared contacts, with counts.

    `audience` (a SQL condition over esp_merge_fields and its named parameters, from
    presend.campaigns.audience_filter) limits new and changed contacts to a campaign batch;
    clears (contacts that left esp_merge_fields) are never limited. Reads only; works before
    the push tables exist (a first preview).
    """
    where, audience_params = audience or ("true", {})
    ledger = (
        "push_ledger"
        if _has_table(con, "push_ledger")
        else "(select null::varchar esp, null::varchar contact_id, null::varchar fields_hash,"
        " null::varchar email, null::varchar fields where false)"
    )
    rejects = (
        "push_rejects"
        if _has_table(con, "push_rejects")
        else "(select null::varchar esp, null::varchar contact_id, null::varchar fields_hash,"
        " null::boolean permanent where false)"
    )
    quarantine = (
        "(select distinct contact_id from quarantined_contacts)"
        if _has_table(con, "quarantined_contacts")
        else "(select null::varchar contact_id where false)"
    )
    columns = [d[0] for d in con.execute("select * from esp_merge_fields limit 0").description]
    merge_fields = [c for c in columns if c not in NOT_MERGE_FIELDS]
    counts = dict.fromkeys(
        ("candidates", "new", "changed", "unchanged", "cleared", "quarantined", "given_up"), 0
    )
    clears: list[Pending] = []

    # An address that another contact of esp_merge_fields holds now is never cleared (a
    # duplicate CRM record took it over): that contact's values go there.
    taken_by_other = (
        'select 1 from esp_merge_fields o where o."EMAIL" = l.email '
        "and o.contact_id <> l.contact_id"
        if "EMAIL" in merge_fields
        else "select 1 where false"
    )
    # Classify in SQL: only the contacts to send come to Python, merge fields as text.
    quoted = [f'"{f}"' for f in merge_fields]
    as_text = ", ".join(f"coalesce(m.{q}::varchar, '') as {q}" for q in quoted)
    classified = f"""
        select m.contact_id, m.fields_hash, {as_text},
            l.fields_hash as ledger_hash, l.fields::varchar as ledger_fields,
            l.email as ledger_email, exists ({taken_by_other}) as ledger_email_taken,
            case
                when q.contact_id is not null then 'quarantined'
                when l.fields_hash is not distinct from m.fields_hash then 'unchanged'
                when coalesce(r.given_up, false) then 'given_up'
                when l.fields_hash is null then 'new'
                else 'changed'
            end as kind
        from (select * from esp_merge_fields where {where}) as m
        left join {ledger} as l on l.esp = $esp and l.contact_id = m.contact_id
        left join {quarantine} as q on q.contact_id = m.contact_id
        left join (
            select contact_id, fields_hash,
                bool_or(permanent) or count(*) >= {MAX_TRANSIENT_ATTEMPTS} as given_up
            from {rejects} where esp = $esp group by all
        ) as r on r.contact_id = m.contact_id and r.fields_hash = m.fields_hash
        """
    params = {"esp": esp, **audience_params}
    by_kind = f"select kind, count(*) from ({classified}) group by kind"
    for kind, n in con.execute(by_kind, params).fetchall():
        counts[kind] = n
    counts["candidates"] = sum(counts.values())
    as_json = ", ".join(f"'{f}', \"{f}\"" for f in merge_fields)
    rows_sql = (
        f"select contact_id, fields_hash, ledger_hash, ledger_fields, ledger_email, "
        f"ledger_email_taken, json_object({as_json})::varchar, {', '.join(quoted)} "
        f"from ({classified}) where kind in ('new', 'changed') order by contact_id"
    )
    for cid, email, fields_json in con.execute(
        f"""
        select l.contact_id, l.email, l.fields::varchar from {ledger} as l
        where l.esp = $esp and l.fields_hash <> '{CLEARED}'
            -- ledger rows from before emails were kept cannot be addressed in the ESP
            and l.email is not null
            and not exists (select 1 from esp_merge_fields m where m.contact_id = l.contact_id)
            -- the address now belongs to another contact (a duplicate CRM record took it):
            -- that contact's values go there, a clear would wipe them
            and not exists ({taken_by_other})
            and not exists (
                select 1 from {rejects} r where r.esp = $esp and r.contact_id = l.contact_id
                    and r.fields_hash = '{CLEARED}' and r.permanent
            )
        order by l.contact_id
        """,
        {"esp": esp},
    ).fetchall():
        held = json.loads(fields_json) if fields_json else {}
        cleared = {f: None for f in held if f != "EMAIL"}
        counts["cleared"] += 1
        clears.append(Pending(Change(cid, email, cleared), CLEARED, "cleared", None, held))
    held_fields = {
        key
        for (key,) in con.execute(
            f"select distinct unnest(json_keys(fields)) from {ledger} where esp = $esp",
            {"esp": esp},
        ).fetchall()
    }
    return Plan(merge_fields, counts, clears, held_fields, con, rows_sql, params)


def _save_outcome(
    con: duckdb.DuckDBPyConnection, esp: str, entries: dict[str, dict], outcome: BatchOutcome
) -> None:
    """Move the ledger for what the ESP acknowledged and keep its rejections (one statement
    per kind: executemany would go row by row)."""
    acked = [cid for cid in outcome.acknowledged if entries[cid]["values"] is not None]
    gone = [cid for cid in outcome.acknowledged if entries[cid]["values"] is None]
    if acked:
        con.execute(
            "insert into push_ledger "
            "(esp, contact_id, fields_hash, acknowledged_at, email, fields) "
            "select $esp, unnest($ids::varchar[]), unnest($hashes::varchar[]), now()::timestamp, "
            "unnest($emails::varchar[]), unnest($fields::varchar[]) "
            "on conflict (esp, contact_id) do update set fields_hash = excluded.fields_hash, "
            "acknowledged_at = excluded.acknowledged_at, email = excluded.email, "
            "fields = excluded.fields",
            {
                "esp": esp,
                "ids": acked,
                "hashes": [entries[c]["hash"] for c in acked],
                "emails": [entries[c]["email"] for c in acked],
                "fields": [entries[c]["values"] for c in acked],
            },
        )
    if gone:
        # Cleared in the ESP: the ledger forgets the contact, as if it was never sent.
        con.execute(
            "delete from push_ledger where esp = $esp and contact_id in (select unnest($ids))",
            {"esp": esp, "ids": gone},
        )
    if outcome.rejected:
        con.execute(
            "insert into push_rejects select $esp, unnest($ids::varchar[]), "
            "unnest($hashes::varchar[]), unnest($reasons::varchar[]), "
            "unnest($permanent::boolean[]), now()::timestamp",
            {
                "esp": esp,
                "ids": [r.contact_id for r in outcome.rejected],
                "hashes": [entries[r.contact_id]["hash"] for r in outcome.rejected],
                "reasons": [r.reason for r in outcome.rejected],
                "permanent": [r.permanent for r in outcome.rejected],
            },
        )


def _collect_and_save(
    con: duckdb.DuckDBPyConnection, adapter: EspAdapter, job_id: str, entries: list[dict]
) -> BatchOutcome:
    batch = [(e["contact_id"], e["record"]) for e in entries]
    outcome = adapter.collect(job_id, batch)
    _save_collected(con, adapter.name, job_id, entries, outcome)
    return outcome


def _save_collected(
    con: duckdb.DuckDBPyConnection,
    esp: str,
    job_id: str,
    entries: list[dict],
    outcome: BatchOutcome,
) -> None:
    """Move the ledger for one collected job and forget the job, in one transaction."""
    con.execute("begin")
    _save_outcome(con, esp, {e["contact_id"]: e for e in entries}, outcome)
    con.execute("delete from push_jobs where esp = ? and job_id = ?", [esp, job_id])
    con.execute("commit")


def _recover(con: duckdb.DuckDBPyConnection, adapter: EspAdapter, result: PushResult) -> None:
    """Collect the import jobs a crashed run submitted but never saw finish."""
    jobs = con.execute(
        "select job_id, batch::varchar from push_jobs where esp = ? order by submitted_at",
        [adapter.name],
    ).fetchall()
    for job_id, batch_json in jobs:
        try:
            outcome = _collect_and_save(con, adapter, job_id, json.loads(batch_json))
        except JobNotFound:
            # The ESP forgot the job: its contacts are not acknowledged, so they go again.
            con.execute(
                "delete from push_jobs where esp = ? and job_id = ?", [adapter.name, job_id]
            )
            continue
        result.recovered_jobs += 1
        result.pushed += len(outcome.acknowledged)
        result.rejected += len(outcome.rejected)
    if jobs:
        log.info("collected %d import jobs left by an earlier run", result.recovered_jobs)


def push(adapter: EspAdapter, audience: tuple[str, dict] | None = None) -> PushResult:
    """Push what changed since the ESP's last acknowledgement; move the ledger per batch.

    `audience` limits the push to a campaign batch's contacts (see `plan`).
    """
    result = PushResult(esp=adapter.name)
    with warehouse.connect() as con:
        ensure_schema(con)
        _recover(con, adapter, result)
        todo = plan(con, adapter.name, audience)
        for key, value in todo.counts.items():
            setattr(result, key, value)
        result.skipped = todo.counts["unchanged"] + todo.counts["given_up"]
        ledger_size = con.execute(
            "select count(*) from push_ledger where esp = ? and fields_hash <> ?",
            [adapter.name, CLEARED],
        ).fetchone()[0]
        total = con.execute("select count(*) from esp_merge_fields").fetchone()[0]
        if total == 0 and ledger_size:
            raise PushSafetyError(
                f"esp_merge_fields is empty but {ledger_size} contacts were pushed to "
                f"{adapter.name}: refusing to clear them all (check the dbt build)"
            )
        if not todo.to_send:
            return result  # nothing to send: not a single request to the ESP
        adapter.prepare(sorted(set(todo.merge_fields) | todo.held_fields))
        unsent: list[Pending] = []

        def encoded() -> Iterator[tuple[dict, bytes]]:
            # Each record is serialised once: its size fills the batch, its bytes the body.
            for p in todo.pending(unsent):
                entry = _entry(p, adapter.record(p.change))
                yield entry, _encode(entry["record"])

        prefix, suffix = adapter.envelope
        limits = (adapter.max_batch_contacts, adapter.max_batch_bytes)
        # Import jobs are collected (polled) in a thread while the next batches are diffed
        # and submitted: the push keeps to the vendor's rate limit instead of waiting out
        # each job. Ledger writes stay in this thread, in the order the jobs were submitted.
        in_flight: deque[tuple[Future, str, list[dict]]] = deque()

        def settle(block: bool) -> None:
            while in_flight and (block or in_flight[0][0].done()):
                future, job_id, entries = in_flight.popleft()
                outcome = future.result()
                _save_collected(con, adapter.name, job_id, entries, outcome)
                result.batches += 1
                result.pushed += len(outcome.acknowledged)
                result.rejected += len(outcome.rejected)
                log.info(
                    "batch %d: %d acknowledged, %d rejected",
                    result.batches,
                    len(outcome.acknowledged),
                    len(outcome.rejected),
                )

        with ThreadPoolExecutor(MAX_JOBS_IN_FLIGHT, thread_name_prefix="collect") as pool:
            try:
                for chunk in _fill(encoded(), *limits, len(prefix) + len(suffix)):
                    batch_entries = [entry for entry, _ in chunk]
                    body = prefix + b",".join(raw for _, raw in chunk) + suffix
                    batch = [(e["contact_id"], e["record"]) for e in batch_entries]
                    job_id = adapter.submit(batch, body)
                    # Known before polling: a crash from here on is recovered without resending.
                    con.execute(
                        "insert into push_jobs values (?, ?, ?, now()::timestamp)",
                        [adapter.name, job_id, json.dumps(batch_entries)],
                    )
                    in_flight.append(
                        (pool.submit(adapter.collect, job_id, batch), job_id, batch_entries)
                    )
                    settle(block=len(in_flight) >= MAX_JOBS_IN_FLIGHT)
                settle(block=True)
            finally:
                for future, _, _ in in_flight:
                    future.cancel()  # a failed push leaves them in push_jobs for the next run
        if unsent:
            # The hash moved but the ESP already holds these values: no request needed.
            con.execute("begin")
            _save_outcome(
                con,
                adapter.name,
                {p.change.contact_id: _entry(p, {}) for p in unsent},
                BatchOutcome(acknowledged=[p.change.contact_id for p in unsent]),
            )
            con.execute("commit")
    return result


def _entry(p: Pending, record: dict) -> dict:
    return {
        "contact_id": p.change.contact_id,
        "hash": p.fields_hash,
        "email": p.change.email,
        "values": p.values_json,
        "record": record,
    }


def mask(field_name: str, value: str | None) -> str | None:
    """A value fit for logs and previews: personal data reduced to a hint."""
    if value is None or not any(m in field_name.upper() for m in PII_MARKERS):
        return value
    if "@" in value:
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@{domain}"
    return f"{value[:1]}***" if value else value


def preview(esp: str, sample: int = 5) -> dict:
    """What a push to `esp` would send now, without calling the ESP: counts and a sample of
    field diffs (contact ids; personal data masked)."""
    with warehouse.connect(read_only=True) as con:
        todo = plan(con, esp)
        pending = list(todo.pending())
    diffs = []
    for p in pending[:sample]:
        diffs.append(
            {
                "contact_id": p.change.contact_id,
                "kind": p.kind,
                "fields": {
                    f: [mask(f, p.previous.get(f)), mask(f, v)] for f, v in p.change.values.items()
                },
            }
        )
    return {"esp": esp, **todo.counts, "to_send": len(pending), "sample": diffs}


def format_preview(doc: dict) -> str:
    """The preview as a few lines a data engineer reads."""
    lines = [
        f"dry run: push to {doc['esp']} would send {doc['to_send']} contacts "
        "(no request made to the ESP)",
        f"  new        {doc['new']:>8}",
        f"  changed    {doc['changed']:>8}",
        f"  unchanged  {doc['unchanged']:>8}",
        f"  cleared    {doc['cleared']:>8}  (left esp_merge_fields: fields emptied in the ESP)",
        f"  quarantined{doc['quarantined']:>8}  (keep their previous values)",
        f"  given up   {doc['given_up']:>8}  (rejected by the ESP for these values)",
    ]
    if doc["sample"]:
        lines.append("  sample of field diffs (old -> new):")
    for d in doc["sample"]:
        lines.append(f"    contact {d['contact_id']} ({d['kind']})")
        for f, (old, new) in d["fields"].items():
            lines.append(f"      {f}: {old!r} -> {new!r}")
    return "\n".join(lines)
