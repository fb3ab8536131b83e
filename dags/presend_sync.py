"""Pre-send sync: sources (CRM, shop, events) -> landing -> DuckDB -> dbt -> quality gate -> ESP.

Every task that opens the DuckDB warehouse read-write runs in the `warehouse` pool (one slot);
HTTP extraction runs outside it.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from presend import alerts, pipeline, sources
from presend.settings import WAREHOUSE_POOL


def warehouse_task(func):
    """A task that opens the DuckDB warehouse read-write: one at a time, in its pool."""
    return task(func, pool=WAREHOUSE_POOL)


@dag(
    dag_id="presend_sync",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["presend", "pre-send"],
    default_args={"owner": "data-engineering", "retries": 2, "retry_delay": timedelta(seconds=30)},
    on_failure_callback=alerts.on_dag_failure,
    doc_md=__doc__,
    # dry_run: the push task prints what it would send and calls no ESP write endpoint.
    params={"dry_run": Param(False, type="boolean", description="preview the push only")},
)
def presend_sync():
    plan = warehouse_task(pipeline.plan_streams)()
    loaded = [
        warehouse_task(pipeline.load_stream).override(task_id=f"load_{stream}")(
            task(pipeline.extract_stream).override(task_id=f"extract_{stream}")(plan, stream)
        )
        for stream in sources.STREAMS
    ]
    built = warehouse_task(pipeline.build_models)()
    gated = warehouse_task(pipeline.gate_merge_fields)()
    pushed = warehouse_task(pipeline.push_merge_fields)()
    recorded = task(pipeline.record_sync_run, pool=WAREHOUSE_POOL, trigger_rule="all_done")()

    loaded >> built >> gated >> pushed >> recorded


presend_sync()
