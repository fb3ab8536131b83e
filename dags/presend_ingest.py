"""Ingest: every source stream (CRM contacts, shop orders and products, events) into the
DuckDB raw tables, then the `presend_raw` asset event the transform is scheduled on.

One mapped extract per stream runs in parallel outside the warehouse pool (HTTP only); each
stream's load runs in the `warehouse` pool (DuckDB allows one writer per file).
"""

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from presend import alerts, pipeline
from presend.assets import RAW
from presend.settings import WAREHOUSE_POOL


@dag(
    dag_id="presend_ingest",
    schedule=timedelta(minutes=30),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["presend", "ingest"],
    default_args={"owner": "data-engineering", "retries": 2, "retry_delay": timedelta(seconds=30)},
    on_failure_callback=alerts.on_dag_failure,
    doc_md=__doc__,
)
def presend_ingest():
    plans = task(pipeline.plan_streams, pool=WAREHOUSE_POOL)()
    extracted = task(pipeline.extract_stream).expand(plan=plans)
    loaded = task(pipeline.load_stream, pool=WAREHOUSE_POOL).expand(extracted=extracted)
    task(pipeline.publish_raw, outlets=[RAW])(loaded)


presend_ingest()
