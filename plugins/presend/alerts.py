"""Failure alerts. Every DAG calls `on_dag_failure`, so a failed sync is never silent."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def on_dag_failure(context) -> None:
    """Log a failed DAG run loudly (the place to hang a notifier: Slack, email, pager)."""
    dag_run = context.get("dag_run")
    log.error(
        "presend: DAG %s run %s failed: %s",
        getattr(dag_run, "dag_id", "?"),
        getattr(dag_run, "run_id", "?"),
        context.get("reason") or context.get("exception"),
    )
