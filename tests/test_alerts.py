"""Failure and deadline alerts reach the notifier the user configured."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from presend import alerts, campaigns, config, settings

sys.path.insert(0, str(Path(__file__).parent / "support"))


@pytest.fixture
def recorded(tmp_path, monkeypatch) -> Path:
    """config/presend.yml with the recording notifier; returns the file it writes."""
    out = tmp_path / "alerts.jsonl"
    doc = yaml.safe_load(settings.CONFIG_FILE.read_text())
    doc["alerts"] = {
        "notifier": "recording_notifier.RecordingNotifier",
        "notifier_kwargs": {"path": str(out), "message": "[presend] {{ presend_alert }}"},
    }
    cfg = tmp_path / "presend.yml"
    cfg.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(settings, "CONFIG_FILE", cfg)
    return out


def messages(path: Path) -> list[str]:
    return [json.loads(line)["message"] for line in path.read_text().splitlines()]


def test_a_failed_dag_run_alerts_through_the_configured_notifier(recorded):
    class Run:
        dag_id, run_id = "presend_sync", "manual__1"

    alerts.on_dag_failure({"dag_run": Run(), "reason": "task_failure"})
    assert messages(recorded) == ["[presend] DAG presend_sync run manual__1 failed: task_failure"]


def test_a_missed_deadline_alerts_with_the_campaign(recorded):
    asyncio.run(
        alerts.deadline_missed("winter_sale", "0:10:00", context={"dag_run": {"run_id": "r7"}})
    )
    (message,) = messages(recorded)
    assert message.startswith("[presend] campaign winter_sale: the pre-send sync (run r7)")
    assert "0:10:00 before send time" in message


def test_a_backfill_of_a_past_batch_does_not_alert(recorded):
    # A backfill run is created after its batch's deadline by design; it pushes nothing.
    run = {"dag_run_id": "backfill__2026-01-05T07:15:00+00:00", "run_type": "backfill"}
    asyncio.run(alerts.deadline_missed("winter_sale", "0:10:00", context={"dag_run": run}))
    assert not recorded.exists()
    run = {"dag_run_id": "scheduled__2026-01-05T07:15:00+00:00", "run_type": "scheduled"}
    asyncio.run(alerts.deadline_missed("winter_sale", "0:10:00", context={"dag_run": run}))
    (message,) = messages(recorded)
    assert "(run scheduled__2026-01-05T07:15:00+00:00)" in message


def test_an_alert_that_cannot_be_sent_does_not_raise(tmp_path, monkeypatch):
    doc = yaml.safe_load(settings.CONFIG_FILE.read_text())
    doc["alerts"] = {"notifier": "no_such_module.Notifier"}
    cfg = tmp_path / "presend.yml"
    cfg.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(settings, "CONFIG_FILE", cfg)
    alerts.send("still fine")  # logged, not raised: the original failure stays visible


def test_the_campaign_deadline_is_the_send_time_minus_the_safety_margin():
    schedule = campaigns.load()
    campaign = schedule.campaigns[0]
    deadline = alerts.campaign_deadline(campaign, schedule.safety_margin)
    # The run's logical date is send_at - lead_time; the alert is due safety_margin before send.
    batch = campaign.batches[0]
    sync_at = batch.send_at - campaign.lead_time
    assert sync_at + deadline.interval == batch.send_at - schedule.safety_margin
    assert deadline.interval > timedelta(0)
    assert deadline.callback.path == "presend.alerts.deadline_missed"
    assert config.load().alerts_notifier == "presend.alerts.LogNotifier"
