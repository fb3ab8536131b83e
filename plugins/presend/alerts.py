"""Alerts: every DAG's failure callback and the campaign deadline callback send their message
through the Airflow notifier configured in config/presend.yml (`alerts.notifier`).

The message is put into the notifier's template context as `presend_alert`, so a notifier's
templated text can say `{{ presend_alert }}` (LogNotifier does by default).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)


class LogNotifier(BaseNotifier):
    """The default notifier: an ERROR line in the log of whatever runs the callback."""

    template_fields = ("message",)

    def __init__(self, message: str = "{{ presend_alert }}") -> None:
        super().__init__()
        self.message = message

    def notify(self, context) -> None:
        log.error("presend alert: %s", self.message)


def configured_notifier() -> BaseNotifier:
    """A fresh instance of the configured notifier."""
    from airflow.sdk.module_loading import import_string

    from presend import config

    cfg = config.load()
    cls = import_string(cfg.alerts_notifier)
    return cls(**cfg.alerts_notifier_kwargs)


def send(message: str, context: dict[str, Any] | None = None) -> None:
    """Send one alert through the configured notifier; never raise into Airflow's callback."""
    ctx = dict(context or {}) | {"presend_alert": message}
    try:
        configured_notifier()(ctx)
    except Exception:  # an alert that cannot be sent must not hide the original failure
        log.exception("presend: could not send alert %r", message)


def on_dag_failure(context) -> None:
    """Failure callback of every presend DAG."""
    dag_run = context.get("dag_run")
    send(
        f"DAG {getattr(dag_run, 'dag_id', '?')} run {getattr(dag_run, 'run_id', '?')} failed: "
        f"{context.get('reason') or context.get('exception')}",
        context,
    )


async def deadline_missed(campaign: str, send_margin: str, context: dict | None = None) -> None:
    """Deadline-alert callback (runs in the triggerer): a campaign batch's push was not
    acknowledged `send_margin` before its send time."""
    ctx = dict(context or {})
    dag_run = ctx.get("dag_run") or {}
    if not isinstance(dag_run, dict):
        dag_run = {"run_id": dag_run.run_id, "run_type": str(dag_run.run_type)}
    # The triggerer hands the run over as Airflow's DAGRunResponse (its id as `dag_run_id`).
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id") or "?"
    if "backfill" in str(dag_run.get("run_type", "")):
        # A backfill of a past batch is created after its deadline by design; the run records
        # the batch as missed and pushes nothing, so there is nothing to warn about.
        log.info("presend: no deadline alert for backfill run %s of campaign %s", run_id, campaign)
        return
    message = (
        f"campaign {campaign}: the pre-send sync (run {run_id}) was not acknowledged by the ESP "
        f"{send_margin} before send time; the batch may go out with stale merge fields"
    )
    await asyncio.to_thread(send, message, ctx)


def campaign_deadline(campaign, safety_margin):
    """The deadline of a campaign's batch sync: its run starts at send time minus lead time
    (the logical date), so the push must be acknowledged by then plus lead time minus the
    safety margin, i.e. `safety_margin` before the send."""
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=campaign.lead_time - safety_margin,
        callback=AsyncCallback(
            deadline_missed,
            kwargs={"campaign": campaign.name, "send_margin": str(safety_margin)},
        ),
        name=f"{campaign.name}_push_acknowledged",
    )
