"""Every DAG imports cleanly and follows the project's rules (owner, tags, retries, alerts,
the `warehouse` pool on tasks that write DuckDB)."""

from __future__ import annotations

import pytest
from airflow.models.dagbag import DagBag

from presend import settings

# Tasks that open the DuckDB warehouse read-write (see presend.warehouse.connect).
WAREHOUSE_WRITERS = {
    "presend_sync": {
        *("plan_streams", "load_crm_contacts", "load_shop_orders", "load_shop_products"),
        "load_events",
        "build_models",
        "gate_merge_fields",
        "push_merge_fields",
        "record_sync_run",
    },
}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    # known_pools turns a task in a pool that `make demo` does not create into an import error.
    return DagBag(
        dag_folder=str(settings.PROJECT_DIR / "dags"),
        known_pools={"default_pool", settings.WAREHOUSE_POOL},
    )


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_the_project_dags_are_loaded(dagbag):
    assert set(WAREHOUSE_WRITERS) <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(WAREHOUSE_WRITERS))
def test_dag_has_tags_owner_retries_and_an_alert(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert "presend" in dag.tags
    assert dag.on_failure_callback, "every DAG must alert someone when it fails"
    for t in dag.tasks:
        assert t.owner == "data-engineering", t.task_id
        assert t.retries >= 1, t.task_id


@pytest.mark.parametrize("dag_id", sorted(WAREHOUSE_WRITERS))
def test_dag_is_acyclic_and_ends_in_the_run_report(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    order = [t.task_id for t in dag.topological_sort()]
    assert len(order) == len(dag.tasks)
    assert order[-1] == "record_sync_run"
    assert dag.get_task("record_sync_run").trigger_rule == "all_done"


@pytest.mark.parametrize("dag_id", sorted(WAREHOUSE_WRITERS))
def test_only_warehouse_writers_share_the_warehouse_pool(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    in_pool = {t.task_id for t in dag.tasks if t.pool == settings.WAREHOUSE_POOL}
    assert in_pool == WAREHOUSE_WRITERS[dag_id]
    # HTTP extraction stays outside the single slot so it can run in parallel.
    assert dag.get_task("extract_crm_contacts").pool != settings.WAREHOUSE_POOL


def test_dag_files_hold_wiring_only():
    # Logic lives in plugins/presend; a DAG file defines no functions beyond tiny wrappers.
    import ast

    for path in (settings.PROJECT_DIR / "dags").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert len(node.body) <= 12, f"{path.name}:{node.name} holds logic"
