"""Pieces of DAG wiring that more than one DAG uses (the DAG files stay thin)."""

from __future__ import annotations

from airflow.sdk import task

from presend import pipeline, sources
from presend.settings import WAREHOUSE_POOL


def warehouse_task(func, **kwargs):
    """A task that opens the DuckDB warehouse read-write: one at a time, in its pool."""
    return task(func, pool=WAREHOUSE_POOL, **kwargs)


def ingest_and_transform():
    """Every source stream extracted (HTTP, in parallel) and loaded (one writer), then dbt.

    Returns the first task and the dbt build task, to wire around them.
    """
    plan = warehouse_task(pipeline.plan_streams)()
    loaded = [
        warehouse_task(pipeline.load_stream).override(task_id=f"load_{stream}")(
            task(pipeline.extract_stream).override(task_id=f"extract_{stream}")(plan, stream)
        )
        for stream in sources.STREAMS
    ]
    built = warehouse_task(pipeline.build_models)()
    loaded >> built
    return plan, built
