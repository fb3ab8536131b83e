"""`make demo`: a sample campaign with two send batches, synced through the real campaign DAG
(`airflow dags test`) against the sandbox, then its run report.

The first batch's sync refreshes the data (ingest, dbt, the quality gate, the push of its
audience: the whole pre-send pipeline); the second batch, due shortly after, finds the data
fresh enough and only gates and pushes its own audience.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from presend import campaigns, config, report, settings, warehouse

CAMPAIGN = "demo_launch"
DAG_ID = f"presend_campaign_{CAMPAIGN}"
LEAD_TIME = timedelta(minutes=45)


def schedule(now: datetime) -> dict:
    """The demo's campaign file: two batches an hour from now, a quarter of an hour apart."""
    first = now.replace(second=0, microsecond=0) + timedelta(hours=1)
    return {
        "safety_margin": "10m",
        "campaigns": [
            {
                "name": CAMPAIGN,
                "esp": config.load().esp_vendor,
                "lead_time": f"{int(LEAD_TIME.total_seconds() // 60)}m",
                "freshness": "2h",
                "batches": [
                    {
                        "name": "loyal_first",
                        "send_at": first.isoformat(),
                        "audience": {"LOYALTY_TIER": ["gold", "platinum"]},
                    },
                    {
                        "name": "everyone_else",
                        "send_at": (first + timedelta(minutes=15)).isoformat(),
                        "audience": {"LOYALTY_TIER": ["bronze", "silver", "member"]},
                    },
                ],
            }
        ],
    }


def run_batch(env: dict[str, str], sync_at: datetime, conf: dict, log_file: Path | None) -> int:
    """One batch's scheduled sync: the campaign DAG at the batch's sync time (its logical
    date), through `airflow dags test`; returns the exit code."""
    from presend import cli

    return cli.dags_test(env, [DAG_ID, sync_at.isoformat(), "--conf", json.dumps(conf)], log_file)


def batch_rows(since: datetime) -> list[dict]:
    """The demo campaign's batch reports recorded since `since`."""
    if not warehouse.exists():
        return []
    with warehouse.connect(read_only=True) as con:
        has = con.execute(
            "select count(*) from information_schema.tables where table_name = 'campaign_runs'"
        ).fetchone()[0]
        if not has:
            return []
        cur = con.execute(
            "select campaign, batch, send_at, status, data_age_seconds, quality_status, pushed, "
            "skipped, quarantined, rejected, push_seconds from campaign_runs "
            "where campaign = ? and recorded_at >= ? order by recorded_at, batch",
            [CAMPAIGN, since],
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def run(env: dict[str, str], sandbox_env: dict[str, str], verbose: bool) -> int:
    """The sample campaign's two batches, then the pipeline summary and the run report."""
    started = datetime.now(UTC)
    doc = schedule(started)
    path = settings.data_dir() / "demo" / "campaigns.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    campaign = campaigns.load(path).campaigns[0]
    env = env | sandbox_env | {"PRESEND_CAMPAIGNS": str(path)}
    logs = settings.data_dir() / "logs"
    codes = []
    for i, batch in enumerate(campaign.batches):
        log_file = None if verbose else logs / f"demo-{batch.name}.log"
        print(
            f"presend: campaign {CAMPAIGN}, batch {batch.name} (send {batch.send_at:%H:%M} UTC): "
            f"its pre-send sync through Airflow" + (f", log in {log_file}" if log_file else ""),
            flush=True,
        )
        # The first batch refreshes the data whatever its age: the demo shows the whole
        # pipeline; the second decides by the campaign's freshness, as a scheduled run does.
        conf = {"refresh": True} if i == 0 else {}
        codes.append(run_batch(env, batch.send_at - campaign.lead_time, conf, log_file))
    rows = batch_rows(started)
    sync = report.latest() if settings.warehouse_path().exists() else None
    print()
    print(report.summary(sync) if sync else "presend: no sync run was recorded")
    print()
    print(report.campaign_summary(CAMPAIGN, rows))
    ok = len(rows) == len(campaign.batches) and all(r["status"] == "pushed" for r in rows)
    if not ok:
        for batch, code in zip(campaign.batches, codes, strict=True):
            log_file = logs / f"demo-{batch.name}.log"
            if code and not verbose and log_file.exists():
                print(f"\npresend: batch {batch.name} FAILED; the end of {log_file}:")
                print("\n".join(log_file.read_text().splitlines()[-40:]))
        return next((c for c in codes if c), 1)
    # `airflow dags test` exits 1 after a successful run of a DAG with a deadline alert
    # (apache/airflow#73428); the recorded batch reports say whether the syncs succeeded.
    return 0
