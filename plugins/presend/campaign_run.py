"""Task bodies of the campaign DAGs: which batch is due, is the data fresh enough, push the
batch's audience, and record the batch's run report in `campaign_runs`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from presend import campaigns, config, warehouse

SCHEMA_SQL = """
create table if not exists campaign_runs (
    campaign varchar not null,
    batch varchar not null,
    run_id varchar not null,
    send_at timestamptz not null,
    status varchar not null,
    data_age_seconds double,
    quality_status varchar,
    pushed integer,
    skipped integer,
    quarantined integer,
    rejected integer,
    push_seconds double,
    acknowledged_at timestamptz,
    recorded_at timestamptz not null,
    detail json,
    primary key (campaign, batch, run_id)
);
"""


def _context() -> dict:
    from airflow.sdk import get_current_context

    return get_current_context()


def _campaign(name: str) -> campaigns.Campaign:
    return next(c for c in campaigns.load().campaigns if c.name == name)


def plan_batch(campaign: str) -> dict:
    """The batches this run syncs: the `batch` param (a run by hand), else those whose sync
    time is the run's logical date. Skips the run when none is due."""
    from airflow.sdk.exceptions import AirflowSkipException

    ctx = _context()
    c = _campaign(campaign)
    wanted = ctx["params"].get("batch")
    if wanted:
        due = [b for b in c.batches if b.name == wanted]
    elif ctx.get("logical_date") is not None:
        due = campaigns.batches_due(c, ctx["logical_date"])
    else:
        due = []
    if not due:
        raise AirflowSkipException(
            f"no batch of campaign {campaign} is due at {ctx.get('logical_date')}; "
            "trigger with the `batch` param to sync one by hand"
        )
    return {
        "campaign": c.name,
        "esp": c.esp,
        "freshness_seconds": c.freshness.total_seconds(),
        "batches": [{"name": b.name, "send_at": b.send_at.isoformat()} for b in due],
    }


def data_age_seconds() -> float | None:
    """Seconds since the least recently loaded source stream was loaded (None: never)."""
    if not warehouse.exists():
        return None
    with warehouse.connect(read_only=True) as con:
        exists = con.execute(
            "select count(*) from information_schema.tables "
            "where table_schema = 'raw' and table_name = 'sync_state'"
        ).fetchone()[0]
        if not exists:
            return None
        oldest = con.execute("select min(updated_at) from raw.sync_state").fetchone()[0]
    if oldest is None:
        return None
    return (datetime.now(UTC).replace(tzinfo=None) - oldest).total_seconds()


def choose_refresh(plan: dict) -> list[str]:
    """Branch: refresh the data (ingest + dbt) when it is older than the campaign allows."""
    age = data_age_seconds()
    if age is None or age > plan["freshness_seconds"]:
        print(f"data age {age} s exceeds the campaign's {plan['freshness_seconds']} s: refreshing")
        return ["plan_streams"]
    print(f"data age {age:.0f} s is within the campaign's {plan['freshness_seconds']:.0f} s")
    return ["gate_merge_fields"]


def push_batch(plan: dict) -> dict:
    """Push the due batches' audience, unless their send time has passed (a late run or a
    backfill: the campaign went out already, so a push now could only surprise)."""
    from presend import esp
    from presend import push as push_stage

    c = _campaign(plan["campaign"])
    names = {b["name"] for b in plan["batches"]}
    batches = [b for b in c.batches if b.name in names]
    now = datetime.now(UTC)
    if all(b.send_at <= now for b in batches):
        return {"status": "missed", "reason": "send time passed before the push"}
    where, params = campaigns.audience_filter([b for b in batches if b.send_at > now])
    cfg = config.load()
    adapter = esp.from_airflow(
        c.esp,
        max_batch_contacts=cfg.esp_batch_max_contacts,
        max_batch_bytes=cfg.esp_batch_max_bytes,
    )
    age = data_age_seconds()
    started = time.monotonic()
    result = push_stage.push(adapter, audience=(where, params)).to_dict()
    return result | {
        "status": "pushed",
        "data_age_seconds": age,
        "push_seconds": round(time.monotonic() - started, 3),
        "acknowledged_at": datetime.now(UTC).isoformat(),
    }


def record_batch_run(plan: dict | None) -> dict:
    """One campaign_runs row per batch of this run (also after a failure or a skip)."""
    ctx = _context()
    if plan is None:
        return {"recorded": 0}
    ti = ctx["ti"]
    quality = ti.xcom_pull(task_ids="gate_merge_fields")
    push = ti.xcom_pull(task_ids="push_batch")
    status = (push or {}).get("status") or ("blocked" if quality is None else "failed")
    with warehouse.connect() as con:
        con.execute(SCHEMA_SQL)
        for b in plan["batches"]:
            con.execute(
                "insert or replace into campaign_runs values "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
                [
                    plan["campaign"],
                    b["name"],
                    ctx["run_id"],
                    b["send_at"],
                    status,
                    (push or {}).get("data_age_seconds"),
                    "passed" if quality is not None else "failed",
                    *(
                        (push or {}).get(k)
                        for k in (
                            "pushed",
                            "skipped",
                            "quarantined",
                            "rejected",
                            "push_seconds",
                            "acknowledged_at",
                        )
                    ),
                    json.dumps({"quality": quality, "push": push}),
                ],
            )
    print(f"campaign {plan['campaign']}: batches {[b['name'] for b in plan['batches']]} {status}")
    # A missed batch (send time passed) is logged, not failed: nothing can be pushed any more,
    # and the deadline alert has already said so.
    if status in ("failed", "blocked"):
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"campaign {plan['campaign']}: batch sync {status}")
    return {"status": status}
