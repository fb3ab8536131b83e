"""The `presend_ingest` DAG: its wiring, and a real run through Airflow (`airflow dags test`)
against the sandbox APIs, under the socket guard that refuses the internet."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from test_ingest_sources import SIZES, Source, assert_raw_equals_source

from presend import cli, settings, sources
from presend.sandbox.server import Sandbox

NETGUARD = Path(__file__).parent / "netguard"


@pytest.fixture(scope="module")
def dag():
    bag = DagBag(
        dag_folder=str(settings.PROJECT_DIR / "dags" / "presend_ingest.py"),
        known_pools={"default_pool", settings.WAREHOUSE_POOL},
    )
    assert bag.import_errors == {}
    return bag.dags["presend_ingest"]


def test_ingest_is_scheduled_owned_retried_and_alerts(dag):
    assert dag.schedule == timedelta(minutes=30)  # on its own clock, not on another DAG
    assert "presend" in dag.tags
    assert dag.on_failure_callback
    for t in dag.tasks:
        assert t.owner == "data-engineering", t.task_id
        assert t.retries >= 1, t.task_id


def test_extract_is_mapped_outside_the_pool_and_loads_run_in_it(dag):
    extract, load = dag.get_task("extract_stream"), dag.get_task("load_stream")
    assert extract.is_mapped and load.is_mapped
    assert extract.pool != settings.WAREHOUSE_POOL  # HTTP in parallel
    assert load.pool == settings.WAREHOUSE_POOL  # one DuckDB writer at a time
    assert dag.get_task("plan_streams").pool == settings.WAREHOUSE_POOL  # reads the cursors
    assert extract.upstream_task_ids == {"plan_streams"}
    assert load.upstream_task_ids == {"extract_stream"}


def test_ingest_updates_the_presend_raw_asset_after_every_load(dag):
    publish = dag.get_task("publish_raw")
    assert [(o.name, o.uri) for o in publish.outlets] == [("presend_raw", "duckdb://presend/raw")]
    assert publish.upstream_task_ids == {"load_stream"}
    assert publish.pool != settings.WAREHOUSE_POOL


def _asset_events(home: Path) -> list[dict]:
    """`presend_raw` asset events in the metadata DB the home's airflow.cfg names."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(home / "airflow.cfg")
    conn = cfg["database"]["sql_alchemy_conn"].replace("${AIRFLOW_HOME}", str(home))
    db_path = conn.removeprefix("sqlite:///")
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "select e.extra from asset_event e join asset a on a.id = e.asset_id "
            "where a.name = 'presend_raw' order by e.id"
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_ingest_runs_through_airflow_loads_every_stream_and_emits_the_asset(
    tmp_path, data_dir, monkeypatch, migrated_airflow_home
):
    monkeypatch.delenv("PRESEND_TASK_POOL")  # the real pool is checked inside tasks
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    guard_log = tmp_path / "netguard.log"
    guard_log.touch()
    env = cli.airflow_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), env["PYTHONPATH"]])
    env["PRESEND_NETGUARD_LOG"] = str(guard_log)
    airflow = str(Path(sys.executable).with_name("airflow"))

    before = len(_asset_events(home))
    with Sandbox(seed=8, esp_state=tmp_path / "esp.json", **SIZES) as sb:
        src = Source(sb)
        for attempt in range(2):
            if attempt:
                src.advance(0.05)
            done = subprocess.run(
                [airflow, "dags", "test", "presend_ingest"],
                env=env | sb.connection_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
            assert_raw_equals_source(src)

    events = _asset_events(home)[before:]
    assert len(events) == 2  # one asset event per ingest run, for the transform to follow
    assert set(events[0]) == set(sources.STREAMS)
    assert events[0]["shop_orders"]["loaded"] == SIZES["orders"]
    assert 0 < events[1]["shop_orders"]["loaded"] < SIZES["orders"]  # incremental
    assert guard_log.read_text() == ""
