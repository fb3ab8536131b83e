"""Paths and names shared by every stage: one place to read them."""

from __future__ import annotations

import os
from pathlib import Path

# plugins/presend/settings.py -> project root is two levels above the package.
PROJECT_DIR = Path(os.environ.get("PRESEND_PROJECT_DIR", Path(__file__).resolve().parents[2]))
DBT_PROJECT_DIR = PROJECT_DIR / "dbt_project"
EXPECTATIONS_DIR = PROJECT_DIR / "expectations"
CONFIG_FILE = Path(os.environ.get("PRESEND_CONFIG", PROJECT_DIR / "config" / "presend.yml"))

WAREHOUSE_POOL = "warehouse"
# Airflow's SQLite metadata (the embedded default) is shared by the scheduler, dag-processor,
# api-server, triggerer and CLI commands; sqlite3's default 5 s busy wait is too short when
# the machine is loaded ("database is locked"). Read by Airflow through
# [database] sql_alchemy_connect_args (an import path).
SQLITE_CONNECT_ARGS = {"timeout": 60}
CRM_CONN_ID = "presend_crm"
ESP_CONN_ID = "presend_esp"

# Switch off every usage ping before dbt, Cosmos or Great Expectations are imported.
TELEMETRY_OFF = {
    "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    "DBT_VERSION_CHECK": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "false",
    "AIRFLOW__SCARF_ANALYTICS__ENABLED": "false",
    "SCARF_ANALYTICS": "false",
    "SCARF_NO_ANALYTICS": "true",
}


def disable_telemetry() -> None:
    """Set the telemetry opt-outs in this process (and its children) unless already set."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def data_dir() -> Path:
    """Directory for the warehouse file and the landing zone (read at call time)."""
    return Path(os.environ.get("PRESEND_DATA_DIR", PROJECT_DIR / "data"))


def warehouse_path() -> Path:
    """The DuckDB warehouse file."""
    return Path(os.environ.get("PRESEND_WAREHOUSE", data_dir() / "warehouse.duckdb"))


def landing_dir() -> Path:
    """Root of the landing zone: immutable page bodies, one folder per stream."""
    return data_dir() / "landing"


def data_docs_dir() -> Path:
    """Where Great Expectations writes the Data Docs site."""
    return data_dir() / "data_docs"
