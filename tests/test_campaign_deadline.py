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

import duckdb
import yaml

from presend import cli, settings

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
SUPPORT = Path(__file__).parent / "support"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_state(env: dict, dag_id: str) -> str | None:
    out = subprocess.run(
        [AIRFLOW, "dags", "list-runs", dag_id, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    # Airflow's own warnings may come first; the runs are the one line of JSON.
    for line in out.splitlines():
        if line.startswith("[{"):
            return json.loads(line)[0]["state"]
    return None


def _all_alerts(path: Path) -> list[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["message"] for line in lines]


def _closed_port_connection() -> str:
    # Nothing listens there: every call fails fast, retries keep the run going past the deadline.
    return json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": _free_port(), "password": "x"}
    )


PAST_SYNC = datetime(2026, 1, 5, 7, 30, tzinfo=UTC)


def test_a_late_batch_alerts_and_a_backfilled_past_batch_is_recorded_as_missed_silently(
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
                    },
                    {  # a batch long gone, backfilled: nothing to push, nothing to alert
                        "name": "past",
                        "esp": "sendgrid",
                        "lead_time": "30m",
                        "freshness": "1h",
                        "batches": [
                            {
                                "name": "january",
                                "send_at": (PAST_SYNC + timedelta(minutes=30)).isoformat(),
                            }
                        ],
                    },
                ],
            }
        )
    )
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    api_port = _free_port()
    env = cli.airflow_env(home) | {
        "PRESEND_CONFIG": str(tmp_path / "presend.yml"),
        "PRESEND_CAMPAIGNS": str(tmp_path / "campaigns.yml"),
        "PRESEND_DATA_DIR": str(tmp_path / "data"),
        "AIRFLOW__API__PORT": str(api_port),
        # Task processes report to the execution API of this api-server, not the default :8080.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        # The log servers' fixed default ports may be taken by another Airflow on the machine.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
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
        assert "the pre-send sync (run manual__" in message
        assert "0:29:00 before send time" in message

        # A backfill of the past batch: the scheduler runs it; with every source and the ESP
        # unreachable, it can only succeed by not refreshing, gating or pushing.
        past = PAST_SYNC.isoformat()
        subprocess.run([AIRFLOW, "dags", "unpause", "presend_campaign_past"], env=env, check=True)
        backfill_create = [
            AIRFLOW,
            "backfill",
            "create",
            "--dag-id",
            "presend_campaign_past",
            "--from-date",
            past,
            "--to-date",
            past,
        ]
        # SQLite answers "database is locked" at once, without the busy wait, when the CLI's
        # read transaction would turn into a write while the scheduler writes (its deadlock
        # rule): the embedded metadata DB's known limit, so the CLI is run again, as a user
        # would, up to 3 times.
        for _ in range(3):
            backfill = subprocess.run(backfill_create, env=env, capture_output=True, text=True)
            if backfill.returncode == 0 or "database is locked" not in backfill.stderr:
                break
            time.sleep(2)
        assert backfill.returncode == 0, backfill.stderr[-3000:] + backfill.stdout[-1000:]
        deadline = time.monotonic() + 300
        while (state := _run_state(env, "presend_campaign_past")) not in ("success", "failed"):
            assert proc.poll() is None, (tmp_path / "standalone.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "standalone.log").read_text()[-3000:]
            time.sleep(3)
        assert state == "success", (tmp_path / "standalone.log").read_text()[-3000:]
        warehouse = tmp_path / "data" / "warehouse.duckdb"
        with duckdb.connect(str(warehouse), read_only=True) as con:
            rows = con.execute(
                "select batch, status, pushed from campaign_runs where campaign = 'past'"
            ).fetchall()
            run_id = con.execute(
                "select run_id from campaign_runs where campaign = 'past'"
            ).fetchone()[0]
        assert rows == [("january", "missed", None)] and run_id.startswith("backfill__")
        # Its deadline passed before the run existed: no alert for it (the late one only).
        assert len(deadline_alerts()) == 1
        assert not [m for m in _all_alerts(alerts_file) if m.startswith("campaign past:")]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
