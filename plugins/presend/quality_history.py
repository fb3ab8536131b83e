"""The quality gate's history in the warehouse, and the reads the quality page makes.

Tables (created on first use):
- `quality_runs`: one row per gate run: outcome (`passed`, `quarantined`, `blocked`), counts,
  the Data Docs page and the failure message.
- `quality_results`: one row per expectation per run (suite, expectation, column, level,
  success, observed value). Expectations on columns the table does not have yet are stored as
  not applicable (`success` null).
- `quality_quarantine`: every contact any run quarantined, with the reasons (history).
- `quarantined_contacts`: the contacts the latest gate run quarantined; the push excludes them.

Nothing here imports Great Expectations: the UI plugin reads these tables.
"""

from __future__ import annotations

import json

import duckdb

SCHEMA_SQL = """
create table if not exists quality_runs (
    run_id varchar primary key,
    checked_at timestamp not null,
    outcome varchar not null,
    rows bigint not null,
    passed integer not null,
    failed integer not null,
    not_applicable integer not null,
    quarantined bigint not null,
    quarantined_share double not null,
    data_docs varchar,
    message varchar
);
create table if not exists quality_results (
    run_id varchar not null,
    suite varchar not null,
    expectation varchar not null,
    "column" varchar,
    level varchar not null,
    success boolean,
    observed varchar,
    unexpected_count bigint,
    reason varchar
);
create table if not exists quality_quarantine (
    run_id varchar not null,
    contact_id varchar not null,
    reasons varchar not null,
    quarantined_at timestamp not null
);
create table if not exists quarantined_contacts (
    contact_id varchar,
    reasons varchar,
    run_id varchar
);
"""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def last_pushed_row_count(con: duckdb.DuckDBPyConnection) -> int | None:
    """Rows of esp_merge_fields in the newest gate run that let the push proceed."""
    rows = con.execute(
        "select rows from quality_runs where outcome in ('passed', 'quarantined') "
        "order by checked_at desc limit 1"
    ).fetchall()
    return rows[0][0] if rows else None


def record(
    con: duckdb.DuckDBPyConnection,
    run: dict,
    results: list[dict],
    quarantine: dict[str, list[str]],
) -> None:
    """Store one gate run; replace `quarantined_contacts` with this run's quarantine."""
    ensure_schema(con)
    con.execute("begin")
    try:
        for table in ("quality_runs", "quality_results", "quality_quarantine"):
            con.execute(f"delete from {table} where run_id = ?", [run["run_id"]])
        con.execute(
            "insert into quality_runs values "
            "($run_id, now()::timestamp, $outcome, $rows, $passed, $failed, $not_applicable, "
            "$quarantined, $quarantined_share, $data_docs, $message)",
            run,
        )
        if results:
            con.executemany(
                "insert into quality_results values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [
                        run["run_id"],
                        r["suite"],
                        r["expectation"],
                        r["column"],
                        r["level"],
                        r["success"],
                        r["observed"],
                        r["unexpected_count"],
                        r["reason"],
                    ]
                    for r in results
                ],
            )
        ids = list(quarantine)
        reasons = ["; ".join(sorted(set(quarantine[c]))) for c in ids]
        con.execute(
            "create or replace table quarantined_contacts as "
            "select unnest($ids::varchar[]) as contact_id, "
            "unnest($reasons::varchar[]) as reasons, $run_id::varchar as run_id",
            {"ids": ids, "reasons": reasons, "run_id": run["run_id"]},
        )
        con.execute(
            "insert into quality_quarantine "
            "select run_id, contact_id, reasons, now()::timestamp from quarantined_contacts"
        )
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute(
            "select 1 from information_schema.tables where table_name = ? "
            "and table_schema = current_schema()",
            [name],
        ).fetchall()
    )


def recent_runs(con: duckdb.DuckDBPyConnection, limit: int = 30) -> list[dict]:
    """The newest gate runs (newest first), with the push counts of the same sync run."""
    if not _has_table(con, "quality_runs"):
        return []
    push = "null::json"
    joins = ""
    if _has_table(con, "sync_runs"):
        push = "s.stages -> 'push'"
        joins += " left join sync_runs s using (run_id)"
    if _has_table(con, "campaign_runs"):
        # A campaign DAG run pushes one or more batches: their counts, summed.
        push = (
            f"coalesce({push}, case when c.run_id is not null then json_object("
            "'pushed', c.pushed, 'skipped', c.skipped, 'rejected', c.rejected, "
            "'quarantined', c.quarantined) end)"
        )
        joins += (
            " left join (select run_id, sum(pushed) as pushed, sum(skipped) as skipped, "
            "sum(rejected) as rejected, sum(quarantined) as quarantined from campaign_runs "
            "group by run_id) c using (run_id)"
        )
    rows = con.execute(
        f"""
        select q.run_id, strftime(q.checked_at, '%Y-%m-%d %H:%M:%S'), q.outcome, q.rows,
               q.passed, q.failed, q.not_applicable, q.quarantined, q.quarantined_share,
               q.data_docs, q.message, {push}
        from quality_runs q {joins}
        order by q.checked_at desc limit ?
        """,
        [limit],
    ).fetchall()
    keys = [
        "run_id",
        "checked_at",
        "outcome",
        "rows",
        "passed",
        "failed",
        "not_applicable",
        "quarantined",
        "quarantined_share",
        "data_docs",
        "message",
    ]
    runs = []
    for row in rows:
        run = dict(zip(keys, row[:-1], strict=True))
        pushed = json.loads(row[-1]) if row[-1] else None
        run["push"] = {
            k: (pushed or {}).get(k) for k in ("pushed", "skipped", "rejected", "quarantined")
        }
        run["push"]["recorded"] = pushed is not None
        runs.append(run)
    return runs


def results_of(con: duckdb.DuckDBPyConnection, run_id: str) -> list[dict]:
    """Every expectation of one run: failures first."""
    if not _has_table(con, "quality_results"):
        return []
    rows = con.execute(
        'select suite, expectation, "column", level, success, observed, unexpected_count, '
        "reason from quality_results where run_id = ? "
        'order by success nulls last, suite, expectation, "column"',
        [run_id],
    ).fetchall()
    keys = [
        "suite",
        "expectation",
        "column",
        "level",
        "success",
        "observed",
        "unexpected_count",
        "reason",
    ]
    return [dict(zip(keys, r, strict=True)) for r in rows]


# Column of the campaign batch report -> its heading on the quality page.
BATCH_COLUMNS = {
    "campaign": "campaign",
    "batch": "batch",
    "send_at": "send at (UTC)",
    "status": "status",
    "data_age_seconds": "data age (s)",
    "quality_status": "quality",
    "pushed": "pushed",
    "skipped": "skipped",
    "quarantined": "quarantined",
    "rejected": "rejected",
    "push_seconds": "push (s)",
}


def batches_of(con: duckdb.DuckDBPyConnection, run_id: str) -> list[dict]:
    """Campaign batches a campaign DAG run pushed after this gate run (`campaign_runs`)."""
    if not _has_table(con, "campaign_runs"):
        return []
    rows = con.execute(
        "select campaign, batch, strftime(send_at, '%Y-%m-%d %H:%M'), status, "
        "round(data_age_seconds), quality_status, pushed, skipped, quarantined, rejected, "
        "round(push_seconds, 1) from campaign_runs where run_id = ? order by campaign, send_at",
        [run_id],
    ).fetchall()
    keys = list(BATCH_COLUMNS)
    return [dict(zip(keys, r, strict=True)) for r in rows]


def quarantine_of(con: duckdb.DuckDBPyConnection, run_id: str, limit: int = 500) -> list[dict]:
    """Contacts one run quarantined (ids and reasons only, never emails)."""
    if not _has_table(con, "quality_quarantine"):
        return []
    rows = con.execute(
        "select contact_id, reasons from quality_quarantine where run_id = ? "
        "order by contact_id limit ?",
        [run_id, limit],
    ).fetchall()
    return [{"contact_id": c, "reasons": r} for c, r in rows]
