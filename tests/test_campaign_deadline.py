"""A campaign batch's deadline alert, for real: Airflow's scheduler and triggerer (standalone)
run a campaign DAG whose push cannot be acknowledged in time, and the deadline callback sends
the alert through the notifier configured in config/presend.yml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from presend import cli, settings

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
SUPPORT = Path(__file__).parent / "support"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port_connection() -> str:
    # Nothing listens there: every call fails fast, retries keep the run going past the deadline.
    return json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": _free_port(), "password": "x"}
    )


def test_a_late_batch_fires_the_deadline_alert_through_the_notifier(
    tmp_path, migrated_airflow_home, monkeypatch
):
    monkeypatch.delenv("PRESEND_TASK_POOL", raising=False)
    alerts_file = tmp_path / "alerts.jsonl"
    cfg = yaml.safe_load(settings.CONFIG_FILE.read_text())
    cfg["alerts"] = {
        "notifier": "recording_notifier.RecordingNotifier",
        "notifier_kwargs": {"path": str(alerts_file)},
    }
    (tmp_path / "presend.yml").write_text(yaml.safe_dump(cfg))
    sync_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    (tmp_path / "campaigns.yml").write_text(
        yaml.safe_dump(
            {
                "safety_margin": "29m",
                "campaigns": [
                    {
                        "name": "late",
                        "esp": "sendgrid",
                        "lead_time": "30m",  # deadline: sync start + 1 minute, already past
                        "freshness": "1h",
                        "batches": [
                            {
                                "name": "only",
                                "send_at": (sync_at + timedelta(minutes=30)).isoformat(),
                            }
                        ],
                    }
                ],
            }
        )
    )
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    env = cli.airflow_env(home) | {
        "PRESEND_CONFIG": str(tmp_path / "presend.yml"),
        "PRESEND_CAMPAIGNS": str(tmp_path / "campaigns.yml"),
        "PRESEND_DATA_DIR": str(tmp_path / "data"),
        "AIRFLOW__API__PORT": str(_free_port()),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
        **{
            f"AIRFLOW_CONN_PRESEND_{name}": _closed_port_connection()
            for name in ("CRM", "SHOP", "EVENTS", "ESP")
        },
    }
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
    log = (tmp_path / "standalone.log").open("w")
    proc = subprocess.Popen(
        [AIRFLOW, "standalone"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        dag_id = "presend_campaign_late"
        deadline = time.monotonic() + 300
        while (
            dag_id
            not in subprocess.run(
                [AIRFLOW, "dags", "list", "-o", "plain"], env=env, capture_output=True, text=True
            ).stdout
        ):  # the dag-processor has not put it in the metadata DB yet
            assert proc.poll() is None, (tmp_path / "standalone.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the DAG was never parsed"
            time.sleep(5)
        subprocess.run([AIRFLOW, "dags", "unpause", dag_id], env=env, check=True)
        trigger = subprocess.run(
            [
                AIRFLOW,
                "dags",
                "trigger",
                dag_id,
                "--logical-date",
                sync_at.isoformat(),
                "--conf",
                json.dumps({"batch": "only"}),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert trigger.returncode == 0, trigger.stdout[-2000:] + trigger.stderr[-2000:]

        def deadline_alerts() -> list[str]:
            lines = alerts_file.read_text().splitlines() if alerts_file.exists() else []
            messages = [json.loads(line)["message"] for line in lines]
            # The run's own failure alert may come too; the deadline's is the one asserted.
            return [m for m in messages if m.startswith("campaign late:")]

        while not deadline_alerts():
            assert proc.poll() is None, (tmp_path / "standalone.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "standalone.log").read_text()[-3000:]
            time.sleep(3)
        (message,) = deadline_alerts()
        assert "the pre-send sync" in message and "0:29:00 before send time" in message
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
