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
    now = datetime.now(UTC)
    run_type = getattr(ctx.get("dag_run"), "run_type", "")
    return {
        "campaign": c.name,
        "esp": c.esp,
        "freshness_seconds": c.freshness.total_seconds(),
        "refresh": bool(ctx["params"].get("refresh")),
        # Every due batch went out already (a backfill, or a run far too late): nothing can be
        # pushed any more, so the run neither refreshes nor gates; it records the miss.
        "missed": all(b.send_at <= now for b in due),
        # "scheduled", "manual", "backfill" (DagRunType's value, not its repr).
        "run_type": str(getattr(run_type, "value", run_type) or ""),
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
    """Branch: refresh the data (ingest + dbt) when it is older than the campaign allows or
    the run asks for it (`refresh` param); go straight to the report when the batches' send
    time has passed."""
    if plan.get("missed"):
        # Skipping both branches skips the push; the report task runs after anything.
        print("every due batch's send time has passed: nothing to refresh, gate or push")
        return []
    if plan.get("refresh"):
        print("the run asks for a refresh (param `refresh`): refreshing")
        return ["plan_streams"]
    age = data_age_seconds()
    if age is None or age > plan["freshness_seconds"]:
        print(f"data age {age} s exceeds the campaign's {plan['freshness_seconds']} s: refreshing")
        return ["plan_streams"]
    print(f"data age {age:.0f} s is within the campaign's {plan['freshness_seconds']:.0f} s")
    return ["gate_merge_fields"]


COUNTS = ("pushed", "skipped", "quarantined", "rejected")


def push_batch(plan: dict) -> dict:
    """Push each due batch's audience, in send order, unless its send time has passed (a late
    run: the batch went out already, so a push now could only surprise). Each batch gets its
    own counts; a contact in two audiences is sent by the first and skipped by the second."""
    from presend import esp
    from presend import push as push_stage

    schedule = campaigns.load()
    c = next(c for c in schedule.campaigns if c.name == plan["campaign"])
    names = {b["name"] for b in plan["batches"]}
    batches = sorted((b for b in c.batches if b.name in names), key=lambda b: b.send_at)
    cfg = config.load()
    adapter = esp.from_airflow(
        c.esp,
        max_batch_contacts=cfg.esp_batch_max_contacts,
        max_batch_bytes=cfg.esp_batch_max_bytes,
    )
    margin = schedule.safety_margin
    age = data_age_seconds()
    per_batch: dict[str, dict] = {}
    for b in batches:
        if b.send_at <= datetime.now(UTC):
            per_batch[b.name] = {"status": "missed", "reason": "send time passed before the push"}
            continue
        started = time.monotonic()
        result = push_stage.push(adapter, audience=campaigns.audience_filter([b])).to_dict()
        acknowledged = datetime.now(UTC)
        late = acknowledged > b.send_at - margin
        if late and plan.get("run_type") != "scheduled":
            # Airflow's deadline alert counts from the run's logical date: right for the
            # scheduled run, not for a run by hand, so this run checks the send time itself.
            from presend import alerts

            alerts.send(
                f"campaign {c.name}: batch {b.name} was acknowledged by the ESP at "
                f"{acknowledged:%H:%M:%S} UTC, less than {margin} before its send time "
                f"{b.send_at.astimezone(UTC):%H:%M} UTC (a run by hand)"
            )
        per_batch[b.name] = result | {
            "status": "pushed",
            "late": late,
            "data_age_seconds": age,
            "push_seconds": round(time.monotonic() - started, 3),
            "acknowledged_at": acknowledged.isoformat(),
        }
    statuses = {r["status"] for r in per_batch.values()}
    return {
        "status": "pushed" if "pushed" in statuses else "missed",
        **{k: sum(r.get(k, 0) for r in per_batch.values()) for k in COUNTS},
        "per_batch": per_batch,
    }


def record_batch_run(plan: dict | None) -> dict:
    """One campaign_runs row per batch of this run (also after a failure or a skip)."""
    ctx = _context()
    if plan is None:
        return {"recorded": 0}
    ti = ctx["ti"]
    quality = ti.xcom_pull(task_ids="gate_merge_fields")
    push = ti.xcom_pull(task_ids="push_batch")
    if ti.xcom_pull(task_ids="plan_streams") is not None:
        # The run refreshed the data: it was a whole pre-send sync, reported like one.
        _record_sync_run(ti, ctx["run_id"])
    statuses = []
    with warehouse.connect() as con:
        con.execute(SCHEMA_SQL)
        for b in plan["batches"]:
            pushed = ((push or {}).get("per_batch") or {}).get(b["name"]) or {}
            if plan.get("missed"):
                status = "missed"
            else:
                status = pushed.get("status") or ("blocked" if quality is None else "failed")
            statuses.append(status)
            con.execute(
                "insert or replace into campaign_runs values "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
                [
                    plan["campaign"],
                    b["name"],
                    ctx["run_id"],
                    b["send_at"],
                    status,
                    pushed.get("data_age_seconds"),
                    None if status == "missed" else "passed" if quality else "failed",
                    *(pushed.get(k) for k in (*COUNTS, "push_seconds", "acknowledged_at")),
                    json.dumps({"quality": quality, "push": pushed}),
                ],
            )
    outcome = dict(zip((b["name"] for b in plan["batches"]), statuses, strict=True))
    print(f"campaign {plan['campaign']}: {outcome}")
    # A missed batch (send time passed) is logged, not failed: nothing can be pushed any more,
    # and the deadline alert has already said so.
    if {"failed", "blocked"} & set(statuses):
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"campaign {plan['campaign']}: batch syncs {outcome}")
    return {"status": outcome}


def _record_sync_run(ti, run_id: str) -> None:
    from presend import pipeline, report

    stages = pipeline.stage_reports(ti, push_task="push_batch")
    push = stages["push"]
    # The sync's push stage: the batches' summed counts, when any batch was pushed.
    stages["push"] = (
        {k: push[k] for k in COUNTS} if push and push.get("status") == "pushed" else None
    )
    print(report.summary(report.record(run_id, stages)))
