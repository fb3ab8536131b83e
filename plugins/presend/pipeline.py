"""Task bodies of the pre-send sync DAG: each reads its inputs, calls one stage, reports.

Every function returns a small JSON-able dict (its XCom), never rows or PII.
"""

from __future__ import annotations

from presend import config, load, quality, report, sources, transform
from presend import push as push_stage
from presend.sources.extract import SourceConnection, extract


def _run_id() -> str:
    from airflow.sdk import get_current_context

    return get_current_context()["run_id"]


def plan_streams() -> list[dict]:
    """Each source stream's committed cursor (None before its first load), for its extract."""
    return [{"stream": name, "cursor": load.read_cursor(name)} for name in sources.STREAMS]


def extract_stream(plan: dict | list[dict], stream: str | None = None) -> dict:
    """One stream's records since its cursor, into the landing zone (HTTP, outside the pool).

    `plan` is the stream's entry of `plan_streams`, or all of it with `stream` naming one.
    """
    if stream is not None:
        plan = next(p for p in plan if p["stream"] == stream)
    definition = sources.get(plan["stream"])
    conn = SourceConnection.from_airflow(definition.conn_id)
    return extract(definition, conn, plan["cursor"], _run_id()).to_dict()


def load_stream(extracted: dict) -> dict:
    """A stream's landed pages into its raw table, with its cursor, in one transaction."""
    return load.load_stream(extracted["stream"], extracted["files"]).to_dict()


def publish_raw(loaded: list[dict]) -> dict:
    """Mark the raw tables updated (the `presend_raw` asset event), with counts per stream."""
    from airflow.sdk import get_current_context

    from presend.assets import RAW

    summary = {r["stream"]: {k: r[k] for k in ("loaded", "rejected", "cursor")} for r in loaded}
    get_current_context()["outlet_events"][RAW].extra = summary
    return summary


def build_models() -> dict:
    """dbt build: staging to esp_merge_fields, with its data tests."""
    return transform.build(*transform.SYNC_BUILD_ARGS).to_dict()


def gate_merge_fields() -> dict:
    """The Great Expectations gate: quarantines bad rows, fails the task on a critical check."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    dag_run = get_current_context()["dag_run"]
    try:
        # Freshness is judged at the run's start, not after extract, load and dbt took time.
        return quality.gate(dag_run.run_id, dag_run.start_date).to_dict()
    except quality.QualityGateError as exc:
        # Retrying cannot fix the data this run has: fail now, without retries.
        raise AirflowFailException(str(exc)) from exc


def push_merge_fields() -> dict:
    """Changed merge fields to the ESP; with the DAG param `dry_run`, only a preview."""
    from airflow.sdk import get_current_context

    from presend import esp

    cfg = config.load()
    if get_current_context()["params"].get("dry_run"):
        preview = push_stage.preview(cfg.esp_vendor)
        # Contact ids and masked values only: the log holds no personal data.
        print(push_stage.format_preview(preview))
        return {k: v for k, v in preview.items() if k != "sample"} | {"dry_run": True}
    adapter = esp.from_airflow(
        cfg.esp_vendor,
        max_batch_contacts=cfg.esp_batch_max_contacts,
        max_batch_bytes=cfg.esp_batch_max_bytes,
    )
    return push_stage.push(adapter).to_dict()


def stage_reports(ti, push_task: str) -> dict[str, dict | None]:
    """What each stage of this run reported (XComs); None for a stage that failed or did not
    run (for extract and load: any of their streams)."""
    per_stream = {
        stage: {name: ti.xcom_pull(task_ids=f"{stage}_{name}") for name in sources.STREAMS}
        for stage in ("extract", "load")
    }
    return {
        stage: None if None in streams.values() else streams
        for stage, streams in per_stream.items()
    } | {
        "transform": ti.xcom_pull(task_ids="build_models"),
        "quality": ti.xcom_pull(task_ids="gate_merge_fields"),
        "push": ti.xcom_pull(task_ids=push_task),
    }


def record_sync_run() -> dict:
    """What every stage reported, as one row in sync_runs (runs even when a stage failed)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    stages = stage_reports(ti, push_task="push_merge_fields")
    run = report.record(_run_id(), stages)
    print(report.summary(run))
    if run["failed_stage"]:
        from airflow.sdk.exceptions import AirflowFailException

        # This task runs after failures too; failing it keeps the DAG run's state honest.
        raise AirflowFailException(f"pre-send sync failed at stage {run['failed_stage']}")
    return {"status": run["status"]}
