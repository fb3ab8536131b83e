"""Transform: when the ingest DAG updates the raw tables (the `presend_raw` asset), dbt builds
staging, intermediate and marts up to esp_merge_fields, with an Airflow task per model and per
model's tests (Cosmos), then regenerates the dbt docs served in the Airflow UI (Browse -> dbt
Docs).

One `dbt build` (Cosmos watcher mode's producer) writes the warehouse, in the `warehouse` pool:
DuckDB allows one writer per file. The model and test tasks follow it (see transform_cosmos).
"""

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from presend import alerts, transform_cosmos
from presend.assets import RAW
from presend.settings import WAREHOUSE_POOL


@dag(
    dag_id="presend_transform",
    schedule=[RAW],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["presend", "transform", "dbt"],
    default_args={
        "owner": "data-engineering",
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "pool": WAREHOUSE_POOL,
    },
    on_failure_callback=alerts.on_dag_failure,
    doc_md=__doc__,
)
def presend_transform():
    models = transform_cosmos.dbt_task_group()
    docs = task(transform_cosmos.generate_docs, pool=WAREHOUSE_POOL)()
    models >> docs


presend_transform()
