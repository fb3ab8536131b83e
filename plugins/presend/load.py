"""Bulk load of landed pages into the warehouse's raw tables.

DuckDB reads every landed page of a run at once (`read_json`), the records are merged on the
primary key, and the stream's cursor moves in the same transaction as the rows, so a crash
either keeps both or neither. Records that cannot be loaded go to `raw.rejects` with the
reason and the landing file they came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import duckdb

from presend import warehouse

SCHEMA_SQL = """
create schema if not exists raw;
create table if not exists raw.crm_contacts (
    id varchar primary key,
    lastmodifieddate timestamp not null,
    archived boolean,
    properties json,
    _landing_file varchar not null,
    _loaded_at timestamp not null
);
create table if not exists raw.sync_state (
    stream varchar primary key,
    cursor_value timestamp not null,
    updated_at timestamp not null
);
create table if not exists raw.load_log (
    landing_file varchar primary key,
    stream varchar not null,
    records integer not null,
    loaded_at timestamp not null
);
create table if not exists raw.rejects (
    stream varchar not null,
    landing_file varchar not null,
    record json,
    reason varchar not null,
    rejected_at timestamp not null
);
"""

# One row per landed record, with the reason it cannot be loaded (null when it can).
CONTACT_RECORDS_SQL = """
create or replace temp table landed as
with pages as (
    select filename as landing_file, unnest(results) as rec
    from read_json($files, columns = {results: 'JSON[]'}, filename = true, format = 'auto')
),
parsed as (
    select
        landing_file,
        rec,
        rec ->> 'id' as id,
        try_cast(replace(rec -> 'properties' ->> 'lastmodifieddate', 'Z', '') as timestamp)
            as lastmodifieddate,
        try_cast(rec ->> 'archived' as boolean) as archived,
        rec -> 'properties' as properties
    from pages
)
select
    *,
    case
        when json_type(rec) <> 'OBJECT' then 'record is not a JSON object'
        when nullif(trim(id), '') is null then 'missing primary key id'
        when json_type(properties) <> 'OBJECT' then 'properties is not a JSON object'
        when lastmodifieddate is null then 'lastmodifieddate missing or not a timestamp'
    end as reject_reason
from parsed
"""

MERGE_CONTACTS_SQL = """
merge into raw.crm_contacts as t
using (
    select * from landed
    where reject_reason is null
    qualify row_number() over (
        partition by id order by lastmodifieddate desc, landing_file desc
    ) = 1
) as s
on t.id = s.id
when matched and s.lastmodifieddate >= t.lastmodifieddate then update set
    lastmodifieddate = s.lastmodifieddate,
    archived = s.archived,
    properties = s.properties,
    _landing_file = s.landing_file,
    _loaded_at = now()::timestamp
when not matched then insert values (
    s.id, s.lastmodifieddate, s.archived, s.properties, s.landing_file, now()::timestamp
)
"""


@dataclass
class LoadResult:
    stream: str
    files: int
    records: int
    loaded: int
    rejected: int
    cursor: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def read_cursor(stream: str) -> str | None:
    """The committed cursor of a stream (ISO, UTC), or None before its first load."""
    if not warehouse.exists():
        return None
    with warehouse.connect(read_only=True) as con:
        if not con.execute(
            "select 1 from information_schema.tables "
            "where table_schema = 'raw' and table_name = 'sync_state'"
        ).fetchone():
            return None
        row = con.execute(
            "select strftime(cursor_value, '%Y-%m-%dT%H:%M:%S.%gZ') from raw.sync_state "
            "where stream = ?",
            [stream],
        ).fetchone()
    return row[0] if row else None


def load_contacts(stream: str, files: list[str]) -> LoadResult:
    """Merge landed contact pages into raw.crm_contacts; skip files loaded before."""
    with warehouse.connect() as con:
        ensure_schema(con)
        done = {
            r[0]
            for r in con.execute(
                "select landing_file from raw.load_log where landing_file in "
                "(select unnest($files::varchar[]))",
                {"files": files},
            ).fetchall()
        }
        todo = [f for f in files if f not in done]
        if not todo:
            return LoadResult(stream, 0, 0, 0, 0, None)
        con.execute("begin")
        try:
            con.execute(CONTACT_RECORDS_SQL, {"files": todo})
            records, rejected, loaded_ids = con.execute(
                "select count(*), count(reject_reason), "
                "count(distinct id) filter (where reject_reason is null) from landed"
            ).fetchone()
            con.execute(
                "insert into raw.rejects select ?, landing_file, rec, reject_reason, "
                "now()::timestamp from landed where reject_reason is not null",
                [stream],
            )
            con.execute(MERGE_CONTACTS_SQL)
            con.execute(
                """
                insert into raw.sync_state
                select $stream, max(lastmodifieddate), now()::timestamp
                from landed where reject_reason is null
                having count(*) > 0
                on conflict (stream) do update set
                    cursor_value = greatest(sync_state.cursor_value, excluded.cursor_value),
                    updated_at = excluded.updated_at
                """,
                {"stream": stream},
            )
            con.execute(
                "insert into raw.load_log select f, $stream, "
                "(select count(*) from landed where landing_file = f), now()::timestamp "
                "from unnest($files::varchar[]) as t(f)",
                {"stream": stream, "files": todo},
            )
            con.execute("commit")
        except Exception:
            con.execute("rollback")
            raise
    return LoadResult(stream, len(todo), records, loaded_ids, rejected, read_cursor(stream))
