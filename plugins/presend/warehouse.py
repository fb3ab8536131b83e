"""The one way to open the DuckDB warehouse.

DuckDB allows a single read-write process per file, so every Airflow task that opens the
warehouse read-write must run in the `warehouse` pool (one slot). `connect(read_only=False)`
checks that when it runs inside an Airflow task, so a mis-wired DAG fails loudly instead of
racing for the file lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

from presend import settings


class WarehousePoolError(RuntimeError):
    """A task tried to write the warehouse outside the `warehouse` pool."""


def _check_pool() -> None:
    pool = os.environ.get("PRESEND_TASK_POOL")
    if pool is None:
        try:
            from airflow.sdk import get_current_context

            pool = get_current_context()["ti"].pool
        except Exception:  # not inside an Airflow task: scripts, tests, dbt
            return
    if pool != settings.WAREHOUSE_POOL:
        raise WarehousePoolError(
            f"this task opens the warehouse read-write but runs in pool {pool!r}; "
            f"put it in pool {settings.WAREHOUSE_POOL!r} (DuckDB allows one writer per file)"
        )


def prepare_write() -> None:
    """What writing the warehouse needs before a process opens it: the `warehouse` pool
    (checked inside an Airflow task) and the file's folder."""
    _check_pool()
    settings.warehouse_path().parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def connect(read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse file; read-write only from inside the `warehouse` pool."""
    path = settings.warehouse_path()
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"warehouse {path} does not exist yet: run the pipeline first")
    else:
        prepare_write()
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def read_with_scratch() -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse attached read-only to an in-memory database the caller may write to.

    Same reads as `connect(read_only=True)` (the warehouse is the default catalog), plus a
    writable `memory` catalog for scratch objects a read-only file refuses, such as types.
    """
    path = settings.warehouse_path()
    if not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist yet: run the pipeline first")
    con = duckdb.connect()
    try:
        con.execute(f"attach '{str(path).replace(chr(39), chr(39) * 2)}' as warehouse (read_only)")
        con.execute("use warehouse")
        yield con
    finally:
        con.close()


def exists() -> bool:
    """Whether the warehouse file has been created yet."""
    return settings.warehouse_path().exists()
