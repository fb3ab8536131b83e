"""Shared fixtures: a private data dir per test and the sandbox servers on loopback."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

# Before anything imports Airflow: a throwaway AIRFLOW_HOME, never the user's ~/airflow.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="presend-test-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Cosmos keeps dbt's partial-parse files in a cache folder (by default one per machine):
# one per test process, so parallel workers never write each other's.
os.environ["AIRFLOW__COSMOS__CACHE_DIR"] = tempfile.mkdtemp(prefix="presend-test-cosmos-")

import pytest

from presend import settings
from presend.sandbox.server import CRM_TOKEN, ESP_API_KEY, Sandbox

settings.disable_telemetry()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PRESEND_DATA_DIR in a temporary folder: a fresh warehouse and landing zone."""
    path = tmp_path / "data"
    monkeypatch.setenv("PRESEND_DATA_DIR", str(path))
    monkeypatch.delenv("PRESEND_WAREHOUSE", raising=False)
    # Outside Airflow, say which pool we would be in, as a task in the warehouse pool does.
    monkeypatch.setenv("PRESEND_TASK_POOL", settings.WAREHOUSE_POOL)
    return path


@pytest.fixture
def sandbox(tmp_path: Path):
    """Sandbox CRM (1,000 contacts) and ESP, started for one test and always stopped."""
    with Sandbox(contacts=1000, seed=7, esp_state=tmp_path / "esp.json") as sb:
        yield sb


@pytest.fixture
def crm_connection(sandbox):
    from presend.sources.crm import CrmConnection

    return CrmConnection(sandbox.crm_url, CRM_TOKEN)


@pytest.fixture
def sendgrid(sandbox):
    from presend.esp.sendgrid import SendGrid

    return SendGrid(sandbox.esp_url, ESP_API_KEY, poll_interval=0.01)


@pytest.fixture(scope="session")
def migrated_airflow_home(tmp_path_factory) -> Path:
    """An AIRFLOW_HOME with migrated SQLite metadata and the pool, made once per test run
    (shared by the pytest-xdist workers: `airflow db migrate` is slow). Tests copy it."""
    from presend import cli

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common base folder
    home = root / "migrated_airflow_home"
    with open(root / "migrated_airflow_home.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cli.prepare_airflow(cli.airflow_env(home))  # at once when another worker did it
        # Airflow wrote this home's absolute path into airflow.cfg (metadata DB, logs): made
        # relative to $AIRFLOW_HOME, every test's copy uses its own DB, not this one.
        cfg = home / "airflow.cfg"
        cfg.write_text(cfg.read_text().replace(str(home), "${AIRFLOW_HOME}"))
    return home
