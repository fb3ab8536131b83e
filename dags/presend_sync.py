"""Pre-send sync: sources (CRM, shop, events) -> landing -> DuckDB -> dbt -> quality gate -> ESP.

Every task that opens the DuckDB warehouse read-write runs in the `warehouse` pool (one slot);
HTTP extraction runs outside it.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from presend import alerts, pipeline
from presend.dag_parts import ingest_and_transform, warehouse_task


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
    _, built = ingest_and_transform()
    gated = warehouse_task(pipeline.gate_merge_fields)()
    pushed = warehouse_task(pipeline.push_merge_fields)()
    recorded = warehouse_task(pipeline.record_sync_run, trigger_rule="all_done")()

    built >> gated >> pushed >> recorded


presend_sync()
