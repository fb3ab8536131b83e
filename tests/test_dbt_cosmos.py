"""The dbt project in Airflow through Cosmos: one task per model and its tests, every one in the
`warehouse` pool, scheduled on the ingest asset, parsed from a cached manifest, run for real
with `airflow dags test`, and its dbt docs served in the Airflow UI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import duckdb
import pytest
from test_dbt_fixture import EXPECTED, load_duckdb_fixture

from presend import cli, settings, transform_cosmos

DAG_ID = "presend_transform"


def _models() -> set[str]:
    return {p.stem for p in (settings.DBT_PROJECT_DIR / "models").rglob("*.sql")}


def _load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(
        dag_folder=str(settings.PROJECT_DIR / "dags" / f"{DAG_ID}.py"),
        known_pools={"default_pool", settings.WAREHOUSE_POOL},
    )
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


@pytest.fixture
def dag(data_dir):
    return _load_dag()


PRODUCER = "dbt.dbt_producer_watcher"


def test_every_model_and_its_tests_is_a_task_and_one_dbt_build_writes(dag):
    task_ids = {t.task_id for t in dag.tasks}
    for model in _models():
        assert f"dbt.{model}.run" in task_ids, model
        assert f"dbt.{model}.test" in task_ids, model  # every model has data tests
    assert "dbt.customer_profile_snapshot.snapshot" in task_ids
    assert task_ids == transform_cosmos.task_ids()
    # One dbt writer at a time: DuckDB allows a single read-write process per file. Only the
    # producer's `dbt build` (and the docs) take the `warehouse` pool's single slot; the
    # per-model and per-test tasks read its results.
    in_pool = {t.task_id for t in dag.tasks if t.pool == settings.WAREHOUSE_POOL}
    assert in_pool == {PRODUCER, "generate_docs"} == transform_cosmos.warehouse_task_ids()
    sensors = [t for t in dag.tasks if t.task_id.startswith("dbt.") and t.task_id in _runs(dag)]
    assert len(sensors) == 2 * len(_models()) + 2  # + the snapshot and its tests
    for t in sensors:
        assert t.producer_task_id == PRODUCER and t.retries == 0, t.task_id
        # They read the build's results once it has finished: one task at a time (as under
        # `airflow dags test`) can never start a sensor whose producer has not run.
        assert PRODUCER in t.get_flat_relative_ids(upstream=True), t.task_id
    for t in dag.tasks:
        assert t.owner == "data-engineering", t.task_id
    assert dag.on_failure_callback
    assert "presend" in dag.tags


def _runs(dag) -> set[str]:
    return {t.task_id for t in dag.tasks if t.task_id.endswith((".run", ".test", ".snapshot"))}


def test_the_dag_runs_when_the_ingest_dag_updates_the_raw_tables(dag):
    from presend.assets import RAW

    assert RAW.name == "presend_raw" and RAW.uri == "duckdb://presend/raw"
    assert list(dag.timetable.asset_condition.objects) == [RAW]


def test_dag_parsing_runs_dbt_parse_only_when_the_project_changed(data_dir, monkeypatch):
    manifest = transform_cosmos.ensure_manifest()
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert transform_cosmos.ensure_manifest() == manifest
    assert calls == []  # fresh manifest: no dbt at parse time
    os.utime(manifest, (0, 0))  # older than every project file, as after an edit
    transform_cosmos.ensure_manifest()
    assert len(calls) == 1 and calls[0][0][1] == "parse"


@pytest.fixture
def airflow_home(tmp_path, data_dir, migrated_airflow_home, monkeypatch):
    # Inside Airflow the real pool is checked, not the tests' stand-in.
    monkeypatch.delenv("PRESEND_TASK_POOL")
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    return home


def test_the_dag_builds_every_model_through_airflow_and_serves_the_docs(airflow_home):
    os.environ["PRESEND_TASK_POOL"] = settings.WAREHOUSE_POOL
    load_duckdb_fixture()
    del os.environ["PRESEND_TASK_POOL"]
    env = cli.airflow_env(airflow_home)
    airflow = str(os.path.join(os.path.dirname(sys.executable), "airflow"))
    proc = subprocess.run(
        [airflow, "dags", "test", DAG_ID],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        ids = {r[0] for r in con.sql("select contact_id from esp_merge_fields").fetchall()}
    assert ids == set(EXPECTED)

    from fastapi.testclient import TestClient
    from presend_dbt_docs_plugin import PresendDbtDocsPlugin

    app = PresendDbtDocsPlugin.fastapi_apps[0]["app"]
    page = TestClient(app).get("/")
    assert page.status_code == 200
    assert "esp_merge_fields" in page.text
