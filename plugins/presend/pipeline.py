"""Task bodies of the pre-send sync DAG: each reads its inputs, calls one stage, reports.

Every function returns a small JSON-able dict (its XCom), never rows or PII.
"""

from __future__ import annotations

from presend import config, load, quality, report, settings, transform
from presend import push as push_stage
from presend.esp.sendgrid import SendGrid
from presend.sources import crm


def _run_id() -> str:
    from airflow.sdk import get_current_context

    return get_current_context()["run_id"]


def read_crm_cursor() -> dict:
    """The committed cursor of the CRM contacts stream (None before the first load)."""
    return {"stream": crm.STREAM, "cursor": load.read_cursor(crm.STREAM)}


def extract_crm_contacts(cursor: dict) -> dict:
    """CRM contacts modified since the cursor, into the landing zone."""
    conn = crm.CrmConnection.from_airflow(settings.CRM_CONN_ID)
    return crm.extract_contacts(conn, cursor["cursor"], _run_id()).to_dict()


def load_crm_contacts(extracted: dict) -> dict:
    """Landed contact pages into raw.crm_contacts, with the cursor."""
    return load.load_contacts(extracted["stream"], extracted["files"]).to_dict()


def build_models() -> dict:
    """dbt build: staging to esp_merge_fields, with its tests."""
    return transform.build().to_dict()


def gate_merge_fields() -> dict:
    """The Great Expectations checkpoint; fails the task when a critical check fails."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return quality.gate().to_dict()
    except quality.QualityGateError as exc:
        # Retrying cannot fix the data this run has: fail now, without retries.
        raise AirflowFailException(str(exc)) from exc


def push_merge_fields() -> dict:
    """Changed merge fields to the ESP."""
    cfg = config.load()
    adapter = SendGrid.from_airflow(
        settings.ESP_CONN_ID,
        max_batch_contacts=cfg.esp_batch_max_contacts,
        max_batch_bytes=cfg.esp_batch_max_bytes,
    )
    return push_stage.push(adapter).to_dict()


def record_sync_run() -> dict:
    """What every stage reported, as one row in sync_runs (runs even when a stage failed)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    task_ids = {
        "extract": "extract_crm_contacts",
        "load": "load_crm_contacts",
        "transform": "build_models",
        "quality": "gate_merge_fields",
        "push": "push_merge_fields",
    }
    stages = {stage: ti.xcom_pull(task_ids=tid) for stage, tid in task_ids.items()}
    run = report.record(_run_id(), stages)
    print(report.summary(run))
    if run["failed_stage"]:
        from airflow.sdk.exceptions import AirflowFailException

        # This task runs after failures too; failing it keeps the DAG run's state honest.
        raise AirflowFailException(f"pre-send sync failed at stage {run['failed_stage']}")
    return {"status": run["status"]}
