"""Every DAG imports cleanly and follows the project's rules (owner, tags, retries, alerts,
the `warehouse` pool on tasks that write DuckDB)."""

from __future__ import annotations

import ast

import pytest
from airflow.dag_processing.dagbag import DagBag

from presend import settings, transform_cosmos

_LOAD_STREAMS = {"plan_streams", "load_crm_contacts", "load_shop_orders", "load_shop_products"}
_LOAD_STREAMS |= {"load_events"}

# Tasks that open the DuckDB warehouse (see presend.warehouse.connect), per DAG. A new DAG
# must say which of its tasks do: the test below fails for a DAG missing here.
WAREHOUSE_WRITERS = {
    "presend_sync": _LOAD_STREAMS
    | {"build_models", "gate_merge_fields", "push_merge_fields", "record_sync_run"},
    "presend_ingest": {"plan_streams", "load_stream"},
    "presend_campaign_winter_sale": _LOAD_STREAMS
    | {"choose_refresh", "build_models", "gate_merge_fields", "push_batch", "record_batch_run"},
    "presend_transform": transform_cosmos.warehouse_task_ids(),  # every dbt task + docs
}
# Tasks whose retry would do harm (see transform_cosmos._wire_watcher).
NO_RETRIES = {"presend_transform": transform_cosmos.tasks_without_retries()}
# The task that records the run's report: it runs even after a failure.
REPORTERS = {"presend_sync": "record_sync_run", "presend_campaign_winter_sale": "record_batch_run"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    # known_pools turns a task in a pool that `make demo` does not create into an import error.
    return DagBag(
        dag_folder=str(settings.PROJECT_DIR / "dags"),
        known_pools={"default_pool", settings.WAREHOUSE_POOL},
    )


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_every_dag_declares_its_warehouse_writers(dagbag):
    assert set(WAREHOUSE_WRITERS) <= set(dagbag.dag_ids)
    undeclared = set(dagbag.dag_ids) - set(WAREHOUSE_WRITERS)
    assert not undeclared, f"add these DAGs' warehouse tasks to WAREHOUSE_WRITERS: {undeclared}"


def test_every_dag_has_tags_owner_retries_and_an_alert(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert "presend" in dag.tags, dag_id
        assert dag.on_failure_callback, f"{dag_id} must alert someone when it fails"
        for t in dag.tasks:
            assert t.owner == "data-engineering", (dag_id, t.task_id)
            if t.task_id not in NO_RETRIES.get(dag_id, set()):
                assert t.retries >= 1, (dag_id, t.task_id)


def test_every_dag_is_acyclic(dagbag):
    for dag in dagbag.dags.values():
        assert len(list(dag.topological_sort())) == len(dag.tasks)


@pytest.mark.parametrize("dag_id", sorted(REPORTERS))
def test_the_run_report_is_recorded_last_even_after_failures(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    reporter = dag.get_task(REPORTERS[dag_id])
    assert [t.task_id for t in dag.topological_sort()][-1] == reporter.task_id
    assert reporter.trigger_rule == "all_done"


def test_only_warehouse_tasks_share_the_warehouse_pool(dagbag):
    for dag_id, dag in dagbag.dags.items():
        if dag_id not in WAREHOUSE_WRITERS:
            continue
        in_pool = {t.task_id for t in dag.tasks if t.pool == settings.WAREHOUSE_POOL}
        assert in_pool == WAREHOUSE_WRITERS[dag_id], dag_id
        # HTTP extraction stays outside the single slot so streams extract in parallel.
        for t in dag.tasks:
            if t.task_id.startswith("extract_"):
                assert t.pool != settings.WAREHOUSE_POOL, (dag_id, t.task_id)


def test_dag_files_hold_wiring_only():
    # Logic lives in plugins/presend; a DAG file defines no functions beyond tiny wrappers.
    for path in (settings.PROJECT_DIR / "dags").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert len(node.body) <= 12, f"{path.name}:{node.name} holds logic"
