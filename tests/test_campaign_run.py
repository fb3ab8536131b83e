"""Campaign batches through the real campaign DAG (`airflow dags test`) against the sandbox:
refresh when stale, push only the batch's audience, reruns and past batches behave."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import requests
import yaml

from presend import cli, settings

DAG_ID = "presend_campaign_spring"


@pytest.fixture
def campaign_env(tmp_path, data_dir, monkeypatch, migrated_airflow_home, sandbox):
    """Run the test campaign's DAG for one batch; returns (exit code, log)."""
    monkeypatch.delenv("PRESEND_TASK_POOL")
    soon = datetime.now(UTC) + timedelta(hours=3)
    schedule = {
        "safety_margin": "10m",
        "campaigns": [
            {
                "name": "spring",
                "esp": "sendgrid",
                "lead_time": "45m",
                "freshness": "2h",
                "batches": [
                    {
                        "name": "vip",
                        "send_at": soon.isoformat(),
                        "audience": {"LOYALTY_TIER": ["gold", "platinum"]},
                    },
                    {
                        "name": "rest",
                        "send_at": (soon + timedelta(hours=1)).isoformat(),
                        "audience": {"LOYALTY_TIER": ["bronze", "silver", "member"]},
                    },
                    {"name": "gone", "send_at": "2026-01-05T08:00:00+00:00", "audience": "all"},
                ],
            }
        ],
    }
    path = tmp_path / "campaigns.yml"
    path.write_text(yaml.safe_dump(schedule))
    monkeypatch.setenv("PRESEND_CAMPAIGNS", str(path))
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)

    def run(batch: str) -> tuple[int, str]:
        env = cli.airflow_env(home) | sandbox.connection_env()
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("airflow")),
                "dags",
                "test",
                DAG_ID,
                "--conf",
                json.dumps({"batch": batch}),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = proc.stdout + proc.stderr
        (tmp_path / f"{batch}-{len(list(tmp_path.glob('*.log')))}.log").write_text(out)
        return _exit_code(proc.returncode, out), out

    return run


def _exit_code(code: int, out: str) -> int:
    """`airflow dags test` exits 1 after a *successful* run of a DAG with a deadline alert
    (apache/airflow#73428, open in 3.3.2: it looks the alert up by a dict instead of its id).
    Count that as success only when the run itself finished in state success."""
    known_bug = "'dict' object has no attribute 'hex'" in out and "DeadlineAlertModel" in out
    succeeded = re.search(rf"Marking run <DagRun {DAG_ID} @ .*> successful", out) is not None
    return 0 if code and known_bug and succeeded else code


def held(sandbox) -> dict:
    return requests.get(f"{sandbox.esp_url}/_sandbox/contacts", timeout=10).json()


def campaign_runs() -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute(
            "select batch, status, pushed, data_age_seconds is not null from campaign_runs "
            "order by recorded_at"
        ).fetchall()


def tiers() -> dict[str, str]:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return dict(con.execute('select "EMAIL", "LOYALTY_TIER" from esp_merge_fields').fetchall())


def test_batches_push_their_audience_refresh_only_when_stale_and_reruns_send_nothing(
    campaign_env, sandbox
):
    code, log = campaign_env("vip")
    assert code == 0, log[-4000:]
    by_email = tiers()
    vip = {e for e, t in by_email.items() if t in ("gold", "platinum")}
    assert vip and set(held(sandbox)) == vip
    assert "refreshing" in log  # there was no data at all: stale

    code, log = campaign_env("rest")
    assert code == 0, log[-4000:]
    assert set(held(sandbox)) == set(by_email)  # the rest joined, nobody else
    assert "is within the campaign's" in log  # fresh: no second ingest

    code, log = campaign_env("vip")  # a rerun by hand: nothing changed, nothing sent
    assert code == 0, log[-4000:]

    code, log = campaign_env("gone")  # its send time passed: nothing may be pushed
    assert code == 0, log[-4000:]

    runs = campaign_runs()
    assert [(b, s) for b, s, _, _ in runs] == [
        ("vip", "pushed"),
        ("rest", "pushed"),
        ("vip", "pushed"),
        ("gone", "missed"),
    ]
    assert runs[0][2] == len(vip) and runs[2][2] == 0
    assert all(age for _, s, _, age in runs if s == "pushed")
