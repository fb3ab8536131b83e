"""The run report: one row per pre-send sync in `sync_runs`, and its text summary."""

from __future__ import annotations

import json

from presend import warehouse

SCHEMA_SQL = """
create table if not exists sync_runs (
    run_id varchar primary key,
    recorded_at timestamp not null,
    status varchar not null,
    failed_stage varchar,
    stages json not null
);
"""

STAGES = ("extract", "load", "transform", "quality", "push")


def record(run_id: str, stages: dict[str, dict | None]) -> dict:
    """Store what each stage reported (None: it failed or did not run)."""
    failed = next((s for s in STAGES if stages.get(s) is None), None)
    stages = _light(stages)
    status = "success" if failed is None else "failed"
    with warehouse.connect() as con:
        con.execute(SCHEMA_SQL)
        con.execute(
            "insert or replace into sync_runs values (?, now()::timestamp, ?, ?, ?)",
            [run_id, status, failed, json.dumps(stages)],
        )
    return {"run_id": run_id, "status": status, "failed_stage": failed, "stages": stages}


def _light(value):
    """The stage reports without file lists: a run report stays small at any scale."""
    if isinstance(value, dict):
        return {k: _light(v) for k, v in value.items() if k not in ("files", "folder")}
    return value


def latest() -> dict | None:
    """The newest recorded run, read without taking the write lock."""
    with warehouse.connect(read_only=True) as con:
        row = con.execute(
            "select run_id, status, failed_stage, stages from sync_runs "
            "order by recorded_at desc limit 1"
        ).fetchone()
    if row is None:
        return None
    return {
        "run_id": row[0],
        "status": row[1],
        "failed_stage": row[2],
        "stages": json.loads(row[3]),
    }


def summary(run: dict) -> str:
    """A few lines a data engineer reads at the end of a run."""
    s = {k: v or {} for k, v in run["stages"].items()}
    extract, load, tr, q, p = (s.get(k, {}) for k in STAGES)
    lines = [
        f"pre-send sync {run['run_id']}: {run['status'].upper()}"
        + (f" (failed at {run['failed_stage']})" if run["failed_stage"] else "")
    ]
    for stream in sorted(extract.keys() | load.keys()):
        ex, ld = extract.get(stream) or {}, load.get(stream) or {}
        lines.append(
            f"  {stream:<14} {ex.get('records', 0):>8} records extracted in "
            f"{ex.get('pages', 0)} pages, {ld.get('loaded', 0)} loaded, "
            f"{ld.get('rejected', 0)} rejected"
        )
    lines += [
        f"  {'dbt':<14} {tr.get('models_built', 0):>8} models built, "
        f"{tr.get('tests_passed', 0)} tests passed",
        f"  {'quality':<14} {q.get('passed', 0):>8} expectations passed, "
        f"{q.get('failed', 0)} failed on {q.get('rows', 0)} rows"
        + (f", {q['quarantined']} contacts quarantined" if q.get("quarantined") else ""),
        f"  {'push':<14} {p.get('pushed', 0):>8} contacts pushed, {p.get('skipped', 0)} skipped "
        f"(unchanged), {p.get('rejected', 0)} rejected by the ESP",
    ]
    return "\n".join(lines)


def campaign_summary(campaign: str, rows: list[dict]) -> str:
    """The run report of a campaign's batches (rows of `campaign_runs`), one line a batch."""
    if not rows:
        return f"campaign {campaign}: no batch run was recorded"

    def num(value, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [
        f"campaign {campaign}: {len(rows)} batch runs",
        f"  {'batch':<16}{'send at':<18}{'status':<9}{'data age':>9}  {'quality':<8}"
        f"{'pushed':>7}{'skipped':>8}{'quarant.':>9}{'rejected':>9}{'push s':>8}",
    ]
    for r in rows:
        lines.append(
            f"  {r['batch']:<16}{r['send_at']:%Y-%m-%d %H:%M}  {r['status']:<9}"
            f"{num(r.get('data_age_seconds'), '{:.0f} s'):>9}  {r.get('quality_status') or '-':<8}"
            f"{num(r.get('pushed')):>7}{num(r.get('skipped')):>8}"
            f"{num(r.get('quarantined')):>9}{num(r.get('rejected')):>9}"
            f"{num(r.get('push_seconds'), '{:.1f}'):>8}"
        )
    return "\n".join(lines)
