"""Campaign batches through the real campaign DAG (`airflow dags test`) against the sandbox:
refresh when stale, push only the batch's audience, reruns and past batches behave."""

from __future__ import annotations

import json
import os
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
SUPPORT = Path(__file__).parent / "support"


@pytest.fixture
def campaign_env(tmp_path, data_dir, monkeypatch, migrated_airflow_home, sandbox):
    """Run the test campaign's DAG for one batch; returns (exit code, log)."""
    monkeypatch.delenv("PRESEND_TASK_POOL")
    soon = datetime.now(UTC) + timedelta(hours=3)
    schedule = {
        "safety_margin": "40m",
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
                    {  # due together with vip: one sync pushes both audiences
                        "name": "silver",
                        "send_at": soon.isoformat(),
                        "audience": {"LOYALTY_TIER": "silver"},
                    },
                    {
                        "name": "rest",
                        "send_at": (soon + timedelta(hours=1)).isoformat(),
                        "audience": {"LOYALTY_TIER": ["bronze", "member"]},
                    },
                    {"name": "gone", "send_at": "2026-01-05T08:00:00+00:00", "audience": "all"},
                    {  # run by hand well inside the safety margin before its send
                        "name": "imminent",
                        "send_at": (datetime.now(UTC) + timedelta(minutes=30)).isoformat(),
                        "audience": {"LOYALTY_TIER": "platinum"},
                    },
                ],
            }
        ],
    }
    path = tmp_path / "campaigns.yml"
    path.write_text(yaml.safe_dump(schedule))
    monkeypatch.setenv("PRESEND_CAMPAIGNS", str(path))
    cfg = yaml.safe_load(settings.CONFIG_FILE.read_text())
    cfg["alerts"] = {
        "notifier": "recording_notifier.RecordingNotifier",
        "notifier_kwargs": {"path": str(tmp_path / "alerts.jsonl")},
    }
    (tmp_path / "presend.yml").write_text(yaml.safe_dump(cfg))
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)

    def run(batch: str | None = None) -> tuple[int, str]:
        """A run by hand of `batch`; without one, the scheduled run of vip's sync time."""
        env = cli.airflow_env(home) | sandbox.connection_env()
        env["PRESEND_CONFIG"] = str(tmp_path / "presend.yml")
        env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
        when = [] if batch else [(soon - timedelta(minutes=45)).isoformat()]
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("airflow")),
                "dags",
                "test",
                DAG_ID,
                *when,
                "--conf",
                json.dumps({"batch": batch} if batch else {}),
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


def alerts(tmp_path: Path) -> list[str]:
    path = tmp_path / "alerts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["message"] for line in lines]


def held(sandbox) -> dict:
    return requests.get(f"{sandbox.esp_url}/_sandbox/contacts", timeout=10).json()


def campaign_runs() -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute(
            "select batch, status, pushed, data_age_seconds is not null, run_id "
            "from campaign_runs order by recorded_at, send_at"
        ).fetchall()


def tiers() -> dict[str, str]:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return dict(con.execute('select "EMAIL", "LOYALTY_TIER" from esp_merge_fields').fetchall())


def test_batches_due_together_push_in_one_run_stale_data_is_refreshed_reruns_send_nothing(
    campaign_env, sandbox, tmp_path
):
    code, log = campaign_env()  # the scheduled sync of vip and silver (same send time)
    assert code == 0, log[-4000:]
    by_email = tiers()
    vip = {e for e, t in by_email.items() if t in ("gold", "platinum")}
    silver = {e for e, t in by_email.items() if t == "silver"}
    assert vip and silver and set(held(sandbox)) == vip | silver
    assert "refreshing" in log  # there was no data at all: stale

    code, log = campaign_env("rest")
    assert code == 0, log[-4000:]
    assert set(held(sandbox)) == set(by_email)  # the rest joined, nobody else
    assert "is within the campaign's" in log  # fresh: no second ingest

    code, log = campaign_env("vip")  # a rerun by hand: nothing changed, nothing sent
    assert code == 0, log[-4000:]

    code, log = campaign_env("gone")  # its send time passed: nothing may be pushed
    assert code == 0, log[-4000:]
    assert "nothing to refresh, gate or push" in log
    assert alerts(tmp_path) == []  # every run so far was in time, or had nothing to push

    code, log = campaign_env("imminent")  # by hand, too close to its send time
    assert code == 0, log[-4000:]
    (late,) = alerts(tmp_path)
    assert late.startswith("campaign spring: batch imminent was acknowledged by the ESP")
    assert "less than 0:40:00 before its send time" in late

    runs = campaign_runs()
    assert [(b, s) for b, s, *_ in runs] == [
        ("vip", "pushed"),
        ("silver", "pushed"),
        ("rest", "pushed"),
        ("vip", "pushed"),
        ("gone", "missed"),
        ("imminent", "pushed"),
    ]
    # One run synced both batches due together, each with its own audience's count.
    assert runs[0][4] == runs[1][4]
    assert (runs[0][2], runs[1][2]) == (len(vip), len(silver))
    assert runs[3][2] == 0 and runs[4][2] is None
    assert all(age for _, s, _, age, _ in runs if s == "pushed")
