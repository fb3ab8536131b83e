"""presend's Airflow executor: the LocalExecutor with dbt imported before it forks its workers.

A LocalExecutor worker is a fork of the scheduler, and each task process a fork of a worker
(on Linux), so every task starts with what the scheduler imported. A new dbt process spends
~10 s here importing dbt and building its machinery before any SQL, more than an incremental
build's own work at 10k contacts; done once in the scheduler (transform.preload_dbt), the
transform task's dbt process (a fork, see transform.run_dbt) skips it on every sync.
Configure it as `[core] executor = presend.executor.LocalExecutor` (AIRFLOW__CORE__EXECUTOR);
it is otherwise Airflow's LocalExecutor.
"""

from __future__ import annotations

import logging

from airflow.executors.local_executor import LocalExecutor as AirflowLocalExecutor

from presend import transform

log = logging.getLogger(__name__)


class LocalExecutor(AirflowLocalExecutor):
    """Airflow's LocalExecutor, whose workers (and so their tasks) start with dbt imported."""

    def start(self) -> None:
        try:
            transform.preload_dbt()
        except Exception:  # a task that needs dbt imports it itself (and reports the error)
            log.exception("presend: could not preload dbt; tasks will import it themselves")
        super().start()
