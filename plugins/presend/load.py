"""Bulk load of landed pages into the warehouse's raw tables, for any declared stream.

DuckDB reads the landed pages at once (`read_text` and its JSON functions, one part of the
files per thread), the records are merged on the primary key, and the stream's cursor moves in
the same transaction as the rows, so a crash keeps both or neither. Records that cannot be
loaded go to `raw.rejects` with the reason and the landing file they came from. Fields a vendor
adds later stay in the JSON payload. A page already loaded (`raw.load_log`) is skipped, so
reloading is a no-op.

A batch is read by the fast path (`fast_landed_sql`: each page parsed for the records' JSON
text and, once more, for the fields the load reads); a batch in which it finds any record it
cannot load is read again by the reference text path (`landed_sql`: every record's text parsed
on its own), which gives the rejects their reasons. Both give the same rows.

The merge is split for speed: one join per batch finds which ids the raw table holds already
(none when the table holds no id in the batch's range); new ids are appended (no join, the
common case of a big first load) and only those ids get an UPDATE, by a copy at least as new as
the stored one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import duckdb

from presend import sources, warehouse
from presend.sources.extract import Column, Stream

STATE_SQL = """
create schema if not exists raw;
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

# Landed JSON per transaction: bounds memory on big first loads; each batch moves the cursor
# only past pages that precede the next batch, so a crash between batches loses nothing.
BATCH_BYTES = int(os.environ.get("PRESEND_LOAD_BATCH_BYTES", 256 * 1024 * 1024))
# DuckDB would take 80% of RAM by default; past this limit it spills to disk instead, so a big
# first load stays well inside a worker's memory.
MEMORY_LIMIT = os.environ.get("PRESEND_LOAD_MEMORY_LIMIT", "1GB")
# The one-pass reading of clean batches (`fast_landed_sql`); off, every batch takes the
# reference path (`landed_sql`). For tests and for comparing the two.
FAST_PATH = os.environ.get("PRESEND_LOAD_FAST_PATH", "1") != "0"


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


def table_sql(stream: Stream) -> str:
    """A stream's raw table. `id` is unique by construction (the load writes an id only once
    and updates it after), without an index: DuckDB keeps an index in memory, and one over
    10M ids takes most of the load's memory limit, so later batches spill and slow down.
    (Tables created with a primary-key index by earlier versions keep working.)"""
    cols = ",\n    ".join(f"{c.name} {c.type}" for c in stream.columns)
    return f"""
create table if not exists raw.{stream.name} (
    id varchar not null,
    {stream.cursor} timestamp not null,
    {cols},
    _landing_file varchar not null,
    _loaded_at timestamp not null
);
"""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """The raw schema: every declared stream's table and the load bookkeeping."""
    con.execute(STATE_SQL)
    for stream in sources.STREAMS.values():
        con.execute(table_sql(stream))


def _json_path(path: list[str]) -> str:
    return "$." + ".".join(f'"{p}"' for p in path)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _payload_source(column: Column) -> str:
    """The `landed` column that holds a payload column's value (the record itself is `rec`)."""
    return "rec" if column.sql.strip() == "rec" else column.name


def _checked_sql(stream: Stream, parsed: str) -> str:
    """`parsed` (a query with landing_file, rec, rec_type, id_type, id, the cursor, the
    `field_<name>` JSON values and the payload columns) with the reason each record cannot be
    loaded (null when it can)."""
    checks = "\n        ".join(f"when {cond} then '{reason}'" for cond, reason in stream.checks)
    key, cursor = stream.primary_key, stream.cursor
    field_names = "".join(f", field_{name}" for name in stream.fields)
    return f"""
select
    * exclude (rec_type, id_type{field_names}),
    case
        when rec_type is distinct from 'OBJECT' then 'record is not a JSON object'
        when nullif(trim(id), '') is null then 'missing primary key {key}'
        when id_type not in ('VARCHAR', 'UBIGINT', 'BIGINT')
            then 'primary key {key} is not a string or an integer'
        {checks}
        when {cursor} is null then '{cursor} missing or not a timestamp'
    end as reject_reason
from ({parsed}
)"""


def _cursor_sql(text: str) -> str:
    """The cursor column (a UTC timestamp) from the cursor's text."""
    return f"timezone('UTC', try_cast({text} as timestamptz))"


def _payload_sql(stream: Stream) -> str:
    return "".join(
        f",\n        {c.sql} as {c.name}" for c in stream.columns if _payload_source(c) != "rec"
    )


def landed_sql(stream: Stream) -> str:
    """One row per landed record, with the reason it cannot be loaded (null when it can).

    The reference path, for any record however malformed: every record of a page is written out
    as JSON text, and that text is parsed once more for every field the load reads.
    A field that is JSON null reads as SQL null, as a missing one does (as in `fast_landed_sql`).
    """
    cursor = stream.cursor
    paths = [_json_path([stream.primary_key]), _json_path(stream.cursor_path)]
    paths += [_json_path([name]) for name in stream.fields]
    paths_sql = ", ".join(f"'{p}'" for p in paths)
    fields = "".join(
        f",\n        case when json_type(f[{n}]) <> 'NULL' then f[{n}] end as field_{name}"
        for n, name in enumerate(stream.fields, 3)
    )
    parsed = f"""
    select
        landing_file,
        rec,
        rec_type,
        json_type(f[1]) as id_type,
        f[1] ->> '$' as id,
        {_cursor_sql("f[2] ->> '$'")} as {cursor}{fields}{_payload_sql(stream)}
    from (
        -- One parse per record for every field the load reads (each `->` would parse again).
        select landing_file, rec, json_type(rec) as rec_type,
            json_extract(rec, [{paths_sql}]) as f
        from (
            select filename as landing_file,
                unnest(json_extract(content, '$."{stream.records_key}"[*]')) as rec
            from {PAGES}
        )
    )"""
    return f"create or replace temp table landed as{_checked_sql(stream, parsed)}\n"


# The landed pages, in parts a thread each: DuckDB reads the files of one `read_text` call on a
# single thread, and everything downstream of that scan (parsing the pages) with it.
PAGES = "{PAGES}"


def _pages(sql: str, files: list[str], parts: int) -> tuple[str, dict]:
    """`sql` reading `files` in `parts` interleaved parts (similar sizes), and its parameters."""
    parts = max(1, min(parts, len(files)))
    union = " union all ".join(f"select * from read_text($files_{i})" for i in range(parts))
    return sql.replace(PAGES, f"({union})"), {f"files_{i}": files[i::parts] for i in range(parts)}


def _record_shape(stream: Stream) -> dict | None:
    """The `json_transform` structure of a record for the fast path: the primary key (JSON),
    the cursor (text) and the checked fields (JSON); None when two of them overlap."""
    shape: dict = {}

    def put(path: list[str], type_: str) -> bool:
        node = shape
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return False
        if path[-1] in node:
            return False
        node[path[-1]] = type_
        return True

    ok = put([stream.primary_key], "JSON") and put(stream.cursor_path, "VARCHAR")
    ok = ok and all(put([name], "JSON") for name in stream.fields)
    return shape if ok else None


def fast_landed_sql(stream: Stream) -> str | None:
    """`landed_sql` in one pass over each page, for batches whose records are all loadable.

    Each page is parsed twice, by `json_extract` for the records' JSON text (the payload, the
    same text as `landed_sql`'s) and by `json_transform` for the fields the load reads, and the
    two lists are unnested side by side; no record is parsed again on its own. A JSON null
    field and a missing one both come out as SQL null. Records it rejects get a reason, but the
    load then builds the batch again with `landed_sql`, whose reasons are the reference.
    None when the stream's fields overlap its cursor's path (the load uses `landed_sql`).
    """
    shape = _record_shape(stream)
    if shape is None:
        return None
    key, cursor = stream.records_key, stream.cursor

    def get(path: list[str]) -> str:
        return "f" + "".join(f"[{_sql_str(p)}]" for p in path)

    structure = _sql_str(json.dumps({key: [shape]}))
    fields = "".join(f",\n        {get([name])} as field_{name}" for name in stream.fields)
    parsed = f"""
    select
        landing_file,
        rec,
        -- json_extract writes records minified: an object's text starts with its brace.
        case when starts_with(rec::varchar, '{{') then 'OBJECT' end as rec_type,
        json_type({get([stream.primary_key])}) as id_type,
        {get([stream.primary_key])} ->> '$' as id,
        {_cursor_sql(get(stream.cursor_path))} as {cursor}{fields}{_payload_sql(stream)}
    from (
        select filename as landing_file,
            unnest(json_extract(content, '$."{key}"[*]')) as rec,
            unnest(json_transform(content, {structure})[{_sql_str(key)}]) as f
        from {PAGES}
    )"""
    return f"create or replace temp table landed as{_checked_sql(stream, parsed)}\n"


LOOKUP_SQL = """
create or replace temp table present as
select id, _loaded_at = $loaded_at as seen
from raw.{table}
where id in (select id from landed where reject_reason is null)
"""


def _rows(stream: Stream, present: bool, dedupe: bool, lookup: bool) -> str:
    """The loadable landed rows of new (or present) ids; with `dedupe`, the newest copy of each."""
    order = f"{stream.cursor} desc, landing_file desc"
    newest = f"qualify row_number() over (partition by id order by {order}) = 1" if dedupe else ""
    join = (f"{'semi' if present else 'anti'} join present using (id)") if lookup else ""
    return f"""
    select landed.* from landed {join}
    where reject_reason is null
    {newest}"""


def insert_sql(stream: Stream, dedupe: bool, lookup: bool = False) -> str:
    """Ids not in the raw table yet: appended, no join with the raw table."""
    names = ["id", stream.cursor, *(_payload_source(c) for c in stream.columns)]
    values = ", ".join(names)
    return f"""
insert into raw.{stream.name}
select {values}, landing_file, $loaded_at::timestamp
from ({_rows(stream, False, dedupe, lookup)}
)
"""


def update_sql(stream: Stream, dedupe: bool) -> str:
    """Ids already in the raw table: updated by a copy at least as new as the stored one."""
    cursor = stream.cursor
    sets = ",\n    ".join(
        f"{n} = s.{src}"
        for n, src in [(cursor, cursor), *((c.name, _payload_source(c)) for c in stream.columns)]
    )
    return f"""
update raw.{stream.name} as t set
    {sets},
    _landing_file = s.landing_file,
    _loaded_at = $loaded_at::timestamp
from ({_rows(stream, True, dedupe, True)}
) as s
where t.id = s.id and s.{cursor} >= t.{cursor}
"""


def read_cursor(stream: str) -> str | None:
    """The committed cursor of a stream (ISO, UTC), or None before its first load."""
    if not warehouse.exists():
        return None
    with warehouse.connect(read_only=True) as con:
        return _cursor(con, stream)


def _cursor(con: duckdb.DuckDBPyConnection, stream: str) -> str | None:
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


def _batches(files: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for f in files:
        n = os.path.getsize(f)
        if out[-1] and size + n > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(f)
        size += n
    return out


def _build_landed(con: duckdb.DuckDBPyConnection, stream: Stream, files: list[str]) -> str:
    """The batch's `landed` table; returns which path built it ("fast" or "text").

    The fast path first; a batch in which it finds any record it cannot load is built again by
    the reference path, so the rejects' reasons are the reference ones and nothing is lost.
    """
    threads = int(con.execute("select current_setting('threads')").fetchone()[0])
    fast = fast_landed_sql(stream) if FAST_PATH else None
    if fast is not None:
        con.execute(*_pages(fast, files, threads))
        if not con.execute(
            "select exists (from landed where reject_reason is not null)"
        ).fetchone()[0]:
            return "fast"
    con.execute(*_pages(landed_sql(stream), files, threads))
    return "text"


def _load_batch(
    con: duckdb.DuckDBPyConnection, stream: Stream, files: list[str], loaded_at: datetime
) -> tuple[int, int, int]:
    """One transaction: the batch's rows, rejects, cursor and load log, or none of them.

    Returns (records, ids loaded that no earlier batch of this call loaded, rejected).
    """
    con.execute("begin")
    try:
        _build_landed(con, stream, files)
        records, rejected, ids, low, high = con.execute(
            "select count(*), count(reject_reason), "
            "count(distinct id) filter (where reject_reason is null), "
            "min(id) filter (where reject_reason is null), "
            "max(id) filter (where reject_reason is null) from landed"
        ).fetchone()
        valid = records - rejected
        # Which of the batch's ids the raw table holds already. None when it holds no id in the
        # batch's range (an empty table: the big first load; or a stream whose ids grow, such as
        # events): the zone maps answer that without reading the table. Else a join built on
        # the batch, whose scan of the raw table also skips the row groups outside that range.
        lookup = (
            ids > 0
            and con.execute(
                f"select exists (from raw.{stream.name} where id between $low and $high)",
                {"low": low, "high": high},
            ).fetchone()[0]
        )
        present_ids = seen_ids = present = 0
        if lookup:
            con.execute(LOOKUP_SQL.format(table=stream.name), {"loaded_at": loaded_at})
            present_ids, seen_ids = con.execute(
                "select count(*), count(*) filter (where seen) from present"
            ).fetchone()
            if present_ids:
                present = con.execute(
                    "select count(*) from landed semi join present using (id) "
                    "where reject_reason is null"
                ).fetchone()[0]
        if rejected:
            con.execute(
                "insert into raw.rejects select ?, landing_file, rec, reject_reason, "
                "now()::timestamp from landed where reject_reason is not null",
                [stream.name],
            )
        # The window that keeps the newest copy costs a sort: skip it when every id is unique.
        dedupe = ids < valid
        if ids > present_ids:
            con.execute(insert_sql(stream, dedupe, present_ids > 0), {"loaded_at": loaded_at})
        if present:
            con.execute(update_sql(stream, dedupe), {"loaded_at": loaded_at})
        _commit_cursor(con, stream)
        con.execute(
            "insert into raw.load_log select landing_file, $stream, count(*), now()::timestamp "
            "from landed group by landing_file",
            {"stream": stream.name},
        )
        # A page without records still counts as loaded.
        con.execute(
            "insert into raw.load_log select f, $stream, 0, now()::timestamp "
            "from unnest($files::varchar[]) as t(f) "
            "where f not in (select landing_file from raw.load_log)",
            {"stream": stream.name, "files": files},
        )
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    # Ids an earlier batch of this call wrote are not counted again.
    return records, ids - seen_ids, rejected


def _commit_cursor(con: duckdb.DuckDBPyConnection, stream: Stream) -> None:
    con.execute(
        f"""
        insert into raw.sync_state
        select $stream, max({stream.cursor}), now()::timestamp
        from landed where reject_reason is null
        having count(*) > 0
        on conflict (stream) do update set
            cursor_value = greatest(sync_state.cursor_value, excluded.cursor_value),
            updated_at = excluded.updated_at
        """,
        {"stream": stream.name},
    )


def load_stream(stream: Stream | str, files: list[str]) -> LoadResult:
    """Merge a stream's landed pages into raw.<stream>; skip pages loaded before."""
    if isinstance(stream, str):
        stream = sources.get(stream)
    with warehouse.connect() as con:
        con.execute("set TimeZone = 'UTC'")
        con.execute(f"set memory_limit = '{MEMORY_LIMIT}'")
        con.execute("set preserve_insertion_order = false")  # lets big inserts stream
        # DuckDB's automatic choice tries every compression on every column segment, which
        # costs more than the whole insert for long JSON strings; zstd suits them, and columns
        # it does not apply to fall back to the usual methods.
        con.execute("set force_compression = 'zstd'")
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
        totals = [0, 0, 0]
        # One timestamp for every batch of this call: an id already written by an earlier batch
        # is told apart by it, so `loaded` counts each id once.
        loaded_at = datetime.now(UTC).replace(tzinfo=None)
        for batch in _batches(todo) if todo else []:
            for k, n in enumerate(_load_batch(con, stream, batch, loaded_at)):
                totals[k] += n
        cursor = _cursor(con, stream.name)
    records, loaded, rejected = totals
    return LoadResult(stream.name, len(todo), records, loaded, rejected, cursor if todo else None)


def load_contacts(stream: str, files: list[str]) -> LoadResult:
    """Merge landed CRM contact pages into raw.crm_contacts (the contacts stream's load)."""
    return load_stream(stream, files)
