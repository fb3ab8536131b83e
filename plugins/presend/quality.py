"""The quality gate: the Great Expectations checkpoints in expectations/ over the warehouse.

Two checkpoints run on every gate:
- `source_health`: one row of raw/staging health at run start (age of each source's newest
  loaded data, share of landed records the load rejected);
- `pre_send_gate`: esp_merge_fields, the rows the push would send.

Every expectation carries `meta.level`. A failed `table` expectation stops the push: the gate
raises QualityGateError naming each failed expectation, its observed value and the Data Docs
page. A failed `row` expectation quarantines only the offending contacts (the push skips them,
so the ESP keeps their previous values) while their share stays under
`quality.max_failed_share`. Every run is stored in the warehouse (quality_history).

GX cannot validate DuckDB through SQLAlchemy (every metric fails), so tables are read from a
read-only DuckDB connection into DataFrames and validated in memory. `great_expectations`
takes seconds to import: it is imported here, inside the gate, and nowhere else.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

import duckdb

from presend import config, quality_history, settings, warehouse

CHECKPOINTS = {"source_health": "source_health", "pre_send_gate": "esp_merge_fields"}
# Validation results and their Data Docs pages kept per suite (the warehouse keeps every
# run's results in quality_results; the index lists the same number).
KEEP_RUNS = 60
ROW_LEVEL_INDEX = "contact_id"
# Raw tables that are not sources.
NOT_SOURCES = {"sync_state", "load_log", "rejects"}


class QualityGateError(RuntimeError):
    """A critical expectation failed: the push must not run."""


@dataclass
class QualityResult:
    run_id: str = ""
    outcome: str = "passed"
    rows: int = 0
    passed: int = 0
    failed: int = 0
    not_applicable: int = 0
    quarantined: int = 0
    failures: list[str] = field(default_factory=list)
    data_docs: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def gx_dir() -> Path:
    """Where GX writes validation results and the Data Docs site."""
    return settings.data_dir() / "gx"


def data_docs_index() -> Path:
    return gx_dir() / "data_docs" / "index.html"


# --- what is validated -------------------------------------------------------------------


def _relation_exists(con: duckdb.DuckDBPyConnection, name: str, schema: str | None = None) -> bool:
    sql = "select 1 from information_schema.tables where table_name = ?"
    args = [name]
    if schema:
        sql += " and table_schema = ?"
        args.append(schema)
    return bool(con.execute(sql, args).fetchall())


def _merge_fields_frame(con: duckdb.DuckDBPyConnection):
    """esp_merge_fields as a DataFrame, with `_recommendations_in_stock` when it can be known.

    GX validates one table at a time, so the join against the product catalogue is done here:
    a contact's recommendations are in stock when every non-empty REC_n_URL names an active
    product (by its handle, `<store>/products/<handle>`) with a variant in stock.
    """
    columns = {r[0] for r in con.execute("describe esp_merge_fields").fetchall()}
    recs = [f"REC_{n}_URL" for n in (1, 2, 3) if f"REC_{n}_URL" in columns]
    if recs and _relation_exists(con, "stg_shop__products"):
        checks = " and ".join(
            f"(coalesce(m.\"{c}\", '') = '' or "
            f"regexp_extract(m.\"{c}\", '/products/([^/?#]+)', 1) in (select handle from stock))"
            for c in recs
        )
        sql = f"""
            with stock as (select handle from stg_shop__products where is_in_stock)
            select m.*, ({checks}) as _recommendations_in_stock from esp_merge_fields m
        """
    else:
        sql = "select * from esp_merge_fields"
    return _fetch_frame(con, sql)


# DuckDB types fetched as other dtypes so GX's pandas metrics take their vectorised paths:
# numpy int64/float64 (other widths fall back to a Python loop per value in
# expect_column_values_to_be_between).
_AS_BIGINT = {"TINYINT", "SMALLINT", "INTEGER", "UTINYINT", "USMALLINT", "UINTEGER"}
_AS_DOUBLE = {"FLOAT", "REAL"}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fetch_frame(con: duckdb.DuckDBPyConnection, sql: str):
    """The query's rows as a DataFrame in the dtypes GX validates fastest.

    String columns whose values repeat (names, tiers, categories, product titles and URLs)
    become pandas categoricals, encoded by DuckDB as ENUMs: the frame then holds one Python
    string per distinct value instead of one per row, which halves the fetch, and null and
    set checks read integer codes instead of a million objects. Mostly-distinct strings (ids,
    emails, hashes) keep DuckDB's string dtype. The ENUM types live in the connection's
    in-memory catalog (`memory`), never in the warehouse.
    """
    con.execute(f"create or replace temp view gate_rows as {sql}")
    columns = [(r[0], r[1]) for r in con.execute("describe gate_rows").fetchall()]
    strings = [name for name, kind in columns if kind == "VARCHAR"]
    counts = con.execute(
        "select count(*)"
        + "".join(f", approx_count_distinct({_quote(c)})" for c in strings)
        + " from gate_rows"
    ).fetchone()
    rows, distinct = counts[0], dict(zip(strings, counts[1:], strict=True))
    select = []
    for n, (name, kind) in enumerate(columns):
        col = _quote(name)
        if kind == "VARCHAR" and distinct[name] * 2 < rows:
            enum = f"memory.gate_enum_{n}"
            con.execute(
                f"create or replace type {enum} as enum "
                f"(select distinct {col} from gate_rows where {col} is not null)"
            )
            select.append(f"cast({col} as {enum}) as {col}")
        elif kind in _AS_BIGINT:
            select.append(f"cast({col} as bigint) as {col}")
        elif kind in _AS_DOUBLE or kind.startswith("DECIMAL"):
            select.append(f"cast({col} as double) as {col}")
        else:
            select.append(col)
    frame = con.execute(f"select {', '.join(select)} from gate_rows").fetch_df()
    con.execute("drop view gate_rows")
    for name, column in frame.items():
        # A BIGINT column with nulls arrives as a nullable Int64; GX wants float64 + NaN.
        if str(column.dtype) in {"Int64", "Float64"}:
            frame[name] = column.astype("float64")
    return frame


def _source_health(con: duckdb.DuckDBPyConnection, started: datetime, q: config.QualityConfig):
    """One row: per raw source the age (hours) of its newest loaded data, and its reject share."""
    import pandas as pd

    sources = [
        r[0]
        for r in con.execute(
            "select table_name from information_schema.tables where table_schema = 'raw' "
            "order by table_name"
        ).fetchall()
        if r[0] not in NOT_SOURCES
    ]
    has_log = _relation_exists(con, "load_log", "raw")
    has_rejects = _relation_exists(con, "rejects", "raw")
    row: dict[str, float] = {}
    start = started.astimezone(UTC).replace(tzinfo=None)
    since = f"?::timestamp - interval ({float(q.rejected_lookback_hours)}) hour"
    for src in sources:
        cols = {r[0] for r in con.execute(f"describe raw.{src}").fetchall()}
        loaded = []
        if "_loaded_at" in cols:
            loaded.append(con.execute(f"select max(_loaded_at) from raw.{src}").fetchall()[0][0])
        if has_log:
            loaded.append(
                con.execute(
                    "select max(loaded_at) from raw.load_log where stream = ?", [src]
                ).fetchall()[0][0]
            )
        newest = max((d for d in loaded if d is not None), default=None)
        if newest is not None:
            row[f"{src}__age_hours"] = max(0.0, (start - newest).total_seconds() / 3600)
        landed = rejected = 0
        if has_log:
            landed = con.execute(
                "select coalesce(sum(records), 0) from raw.load_log "
                f"where stream = ? and loaded_at >= {since}",
                [src, start],
            ).fetchall()[0][0]
        if has_rejects:
            rejected = con.execute(
                f"select count(*) from raw.rejects where stream = ? and rejected_at >= {since}",
                [src, start],
            ).fetchall()[0][0]
        row[f"{src}__rejected_share"] = rejected / landed if landed else 0.0
    ages = [v for k, v in row.items() if k.endswith("__age_hours")]
    if ages:
        row["newest_source_age_hours"] = min(ages)
    return pd.DataFrame([row])


def _parameters(
    cfg: config.Config, previous_rows: int | None, sources: list[str]
) -> dict[str, object]:
    """Values of the suites' `$PARAMETER`s: thresholds from config, the volume band."""
    q = cfg.quality
    params: dict[str, object] = {
        "min_rows": 1,
        "max_rows": None,
        "loyalty_tiers": sorted({*q.loyalty_tiers, cfg.merge_field_defaults.get("LOYALTY_TIER")}),
        "merge_fields_freshness_hours": q.merge_fields_freshness_hours,
        "max_rejected_share": q.max_rejected_share,
    }
    if previous_rows:
        params["min_rows"] = max(1, math.ceil(previous_rows * (1 - q.volume_max_drop)))
        params["max_rows"] = math.floor(previous_rows * (1 + q.volume_max_growth))
    for src in sources:
        params[f"freshness_hours__{src}"] = q.freshness_hours.get(
            src, q.merge_fields_freshness_hours
        )
    return params


# --- the GX context ----------------------------------------------------------------------


def _columns_of(kwargs: dict) -> list[str]:
    cols = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    return cols + list(kwargs.get("column_list") or [])


def _run_context(columns: dict[str, set[str]]) -> tuple[Path, list[dict]]:
    """A per-run copy of expectations/ whose suites hold only the applicable expectations.

    The suites in git are the whole contract, including merge fields the models do not
    produce yet; an expectation on a column the validated table does not have is not
    applicable (recorded as such) rather than a failure. GX refuses to run a suite that differs
    from its stored copy, so the applicable subset is stored in this run's copy.
    """
    root = gx_dir() / "context"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(settings.EXPECTATIONS_DIR, root, ignore=shutil.ignore_patterns("uncommitted"))
    skipped = []
    for suite_file in (root / "expectations").glob("*.json"):
        suite = json.loads(suite_file.read_text())
        have = columns.get(suite["name"], set())
        keep = []
        for e in suite["expectations"]:
            missing = [c for c in _columns_of(e["kwargs"]) if c not in have]
            if missing:
                skipped.append({"suite": suite["name"], **e})
            else:
                keep.append(e)
        suite["expectations"] = keep
        suite_file.write_text(json.dumps(suite, indent=2))
    return root, skipped


def _observed(r) -> tuple[str, int | None]:
    res = r.result or {}
    count = res.get("unexpected_count")
    observed = res.get("observed_value")
    if r.exception_info and r.exception_info.get("raised_exception"):
        message = str(r.exception_info.get("exception_message") or "")[:200]
        return f"error: {message}", count
    if observed is None and count is not None:
        # Counts only: the unexpected values themselves may be emails or names (PII).
        observed = f"{count} unexpected rows ({round(res.get('unexpected_percent') or 0, 3)}%)"
    if isinstance(observed, float):
        observed = round(observed, 3)
    return str(observed), count


def _offending_contacts(batch, expectation, params: dict) -> list[str]:
    """contact_ids of the rows that fail one row-level expectation (ids only, no values)."""
    res = batch.validate(
        expectation,
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": [ROW_LEVEL_INDEX],
            "return_unexpected_index_query": False,
        },
        expectation_parameters=params,
    )
    return [str(row[ROW_LEVEL_INDEX]) for row in res.result.get("unexpected_index_list") or []]


def _docs_page(context, identifier) -> str:
    for site in context.get_docs_sites_urls(resource_identifier=identifier):
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            return unquote(url.removeprefix("file://"))
    return str(data_docs_index())


def _prune(keep: int = KEEP_RUNS) -> None:
    """Drop the oldest runs' validation results and Data Docs pages beyond `keep` per suite,
    so the site index (rebuilt every run) does not slow down as runs accumulate."""
    for store in (gx_dir() / "validations", gx_dir() / "data_docs" / "validations"):
        for suite in (d for d in store.glob("*") if d.is_dir()):
            runs = sorted(
                (d for d in suite.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime
            )
            for old in runs[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


# --- importing GX ------------------------------------------------------------------------

# Imported by GX at module level for expectations presend does not use (KL divergence, KS
# tests): altair and scipy.stats are a third of GX's import time.
DEFERRED_BY_GX = ("altair", "scipy.stats")


class _DeferredImports(importlib.abc.MetaPathFinder):
    """Load the named modules lazily: executed on first attribute access, not at import."""

    def __init__(self, names: tuple[str, ...]):
        self.names = set(names)

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def load_great_expectations():
    """Import great_expectations, deferring DEFERRED_BY_GX until an expectation uses them."""
    if "great_expectations" in sys.modules:
        return sys.modules["great_expectations"]
    finder = _DeferredImports(DEFERRED_BY_GX)
    sys.meta_path.insert(0, finder)
    try:
        import great_expectations
    finally:
        sys.meta_path.remove(finder)
    return great_expectations


# --- the gate ----------------------------------------------------------------------------


def gate(run_id: str | None = None, run_started_at: datetime | None = None) -> QualityResult:
    """Validate the sources and esp_merge_fields; quarantine bad rows or block the push.

    Raises QualityGateError when a table-level expectation fails or too many rows would be
    quarantined; the run is recorded in the warehouse either way.
    """
    settings.disable_telemetry()
    started = run_started_at or datetime.now(UTC)
    run_id = run_id or f"manual__{started.isoformat(timespec='seconds')}"
    os.environ["PRESEND_GX_DIR"] = str(gx_dir())
    cfg = config.load()

    with warehouse.read_with_scratch() as con:
        frame = _merge_fields_frame(con)
        health = _source_health(con, started, cfg.quality)
        previous = (
            quality_history.last_pushed_row_count(con)
            if _relation_exists(con, "quality_runs")
            else None
        )
    sources = [c.removesuffix("__age_hours") for c in health.columns if c.endswith("__age_hours")]
    params = _parameters(cfg, previous, sources)
    frames = {"source_health": health, "pre_send_gate": frame}
    root, skipped = _run_context(
        {CHECKPOINTS[name]: set(df.columns) for name, df in frames.items()}
    )

    gx = load_great_expectations()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.execution_engine import pandas_execution_engine

    # GX fingerprints every in-memory batch by hashing all its values (seconds at 1M rows),
    # only to label the batch; presend labels batches by run id instead.
    pandas_execution_engine.HASH_THRESHOLD = 0

    _prune(KEEP_RUNS - 1)
    context = gx.get_context(mode="file", context_root_dir=str(root))
    results: list[dict] = []
    quarantine: dict[str, list[str]] = {}
    table_failures: list[str] = []
    docs = str(data_docs_index())
    for name, df in frames.items():
        suite = CHECKPOINTS[name]
        if not context.suites.get(suite).expectations:
            continue
        run = context.checkpoints.get(name).run(
            batch_parameters={"dataframe": df},
            expectation_parameters=params,
            run_id=RunIdentifier(run_name=run_id, run_time=started),
        )
        for identifier, validation in run.run_results.items():
            page = _docs_page(context, identifier)
            if name == "pre_send_gate":
                docs = page
            batch = None
            for r in validation.results:
                cfg_e = r.expectation_config
                level = (cfg_e.meta or {}).get("level", "table")
                reason = (cfg_e.meta or {}).get("reason", cfg_e.type)
                observed, count = _observed(r)
                column = cfg_e.kwargs.get("column")
                results.append(
                    {
                        "suite": suite,
                        "expectation": cfg_e.type,
                        "column": column,
                        "level": level,
                        "success": bool(r.success),
                        "observed": observed,
                        "unexpected_count": count,
                        "reason": reason,
                    }
                )
                if r.success:
                    continue
                label = f"{cfg_e.type}({column or suite}): observed {observed} ({reason})"
                errored = bool(r.exception_info and r.exception_info.get("raised_exception"))
                if level != "row" or errored or name != "pre_send_gate":
                    table_failures.append(label)
                    continue
                if batch is None:
                    batch = (
                        context.data_sources.get("warehouse")
                        .get_asset(suite)
                        .get_batch_definition("whole_table")
                        .get_batch(batch_parameters={"dataframe": df})
                    )
                offending = _offending_contacts(batch, cfg_e.to_domain_obj(), params)
                if not offending:
                    # A failure the quarantine cannot attribute to contacts must not pass.
                    table_failures.append(label + " (offending contacts not identified)")
                for contact in offending:
                    quarantine.setdefault(contact, []).append(reason)
    for e in skipped:
        results.append(
            {
                "suite": e["suite"],
                "expectation": e["type"],
                "column": e["kwargs"].get("column"),
                "level": e["meta"].get("level", "table"),
                "success": None,
                "observed": "not applicable: column not present",
                "unexpected_count": None,
                "reason": e["meta"].get("reason", e["type"]),
            }
        )

    rows = len(frame)
    share = len(quarantine) / rows if rows else 0.0
    if share > cfg.quality.max_failed_share:
        table_failures.append(
            f"quarantined share: observed {len(quarantine)} of {rows} contacts "
            f"({share:.1%}) > quality.max_failed_share {cfg.quality.max_failed_share:.1%}"
        )
    outcome = "blocked" if table_failures else ("quarantined" if quarantine else "passed")
    failed = sum(1 for r in results if r["success"] is False)
    result = QualityResult(
        run_id=run_id,
        outcome=outcome,
        rows=rows,
        passed=sum(1 for r in results if r["success"]),
        failed=failed,
        not_applicable=len(skipped),
        quarantined=len(quarantine),
        failures=[r["observed"] for r in results if r["success"] is False],
        data_docs=docs,
    )
    row_failures = [
        f"{r['expectation']}({r['column']}): observed {r['observed']} ({r['reason']})"
        for r in results
        if r["success"] is False and r["level"] == "row"
    ]
    message = None
    if outcome == "blocked":
        message = (
            f"quality gate blocked the push: {len(table_failures)} critical failure(s) on "
            f"esp_merge_fields ({rows} rows); nothing is pushed.\n  - "
            + "\n  - ".join(table_failures)
            + (
                "\nrow-level failures (their contacts would be quarantined):\n  - "
                + "\n  - ".join(row_failures)
                if row_failures
                else ""
            )
            + f"\nData Docs: {docs} (Airflow UI: Browse > Pre-send quality)"
        )
        result.failures = table_failures + row_failures
    else:
        result.failures = row_failures
    with warehouse.connect() as con:
        quality_history.record(
            con,
            {
                "run_id": run_id,
                "outcome": outcome,
                "rows": rows,
                "passed": result.passed,
                "failed": failed,
                "not_applicable": len(skipped),
                "quarantined": len(quarantine),
                "quarantined_share": share,
                "data_docs": docs,
                "message": message,
            },
            results,
            quarantine,
        )
    if message:
        raise QualityGateError(message)
    return result
