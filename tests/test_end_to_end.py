"""The whole pre-send sync through Airflow (`airflow dags test`) against the sandbox servers,
in a temporary AIRFLOW_HOME and data dir, under a socket guard that refuses the internet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import requests

from presend import cli, settings
from presend.sandbox.crm import EPOCH, make_contact

NETGUARD = Path(__file__).parent / "netguard"


@pytest.fixture
def airflow_run(tmp_path, data_dir, monkeypatch, migrated_airflow_home):
    """Run the presend_sync DAG once; returns (exit code, log text)."""
    guard_log = tmp_path / "netguard.log"
    guard_log.touch()
    # The real Airflow pool must be checked inside tasks, not the tests' stand-in.
    monkeypatch.delenv("PRESEND_TASK_POOL")
    shutil.copytree(migrated_airflow_home, tmp_path / "airflow_home")
    runs = []

    def run(sandbox) -> tuple[int, str]:
        env = cli.airflow_env(tmp_path / "airflow_home")
        env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), env["PYTHONPATH"]])
        env["PRESEND_NETGUARD_LOG"] = str(guard_log)
        log = tmp_path / f"sync-{len(runs)}.log"
        code = cli.run_sync(env | sandbox.connection_env(), log)
        runs.append(log)
        return code, log.read_text()

    run.guard_log = guard_log
    return run


def esp_contacts(sandbox) -> dict[str, dict]:
    return requests.get(f"{sandbox.esp_url}/_sandbox/contacts", timeout=10).json()


def put_requests(sandbox) -> int:
    counts = requests.get(f"{sandbox.esp_url}/_sandbox/requests", timeout=10).json()
    return counts.get("PUT /v3/marketing/contacts", 0)


def test_sync_pushes_merge_fields_once_and_never_calls_the_internet(airflow_run, sandbox):
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]

    # What the ESP received is exactly the esp_merge_fields contract.
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        rows = con.sql(
            'select "EMAIL", "FIRST_NAME", "LOYALTY_TIER" from esp_merge_fields'
        ).fetchall()
        run = con.sql("select status from sync_runs").fetchall()
    held = esp_contacts(sandbox)
    assert run == [("success",)]
    assert len(rows) > 0
    assert {e: (c["first_name"], c["custom_fields"]["LOYALTY_TIER"]) for e, c in held.items()} == {
        email: (first, tier) for email, first, tier in rows
    }

    # Consent and email validity decide who leaves the warehouse, from the CRM's own data.
    crm = [make_contact(7, i, EPOCH)["properties"] for i in range(1, 1001)]
    no_consent = {p["email"].strip().lower() for p in crm if p["hs_marketable_status"] != "true"}
    assert no_consent and not no_consent & held.keys()
    assert not any(" " in e or e != e.lower() for e in held)
    blank_names = {p["email"].strip().lower() for p in crm if not p["firstname"].strip()}
    assert any(held[e]["first_name"] == "there" for e in blank_names & held.keys())

    # A second run with no source changes sends nothing.
    puts = put_requests(sandbox)
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    assert put_requests(sandbox) == puts

    assert airflow_run.guard_log.read_text() == ""


def test_a_failed_quality_gate_stops_the_push(airflow_run, sandbox, monkeypatch, tmp_path):
    # A merge-field default longer than the ESP's first_name limit fails the gate for every
    # contact without a first name: nothing may reach the ESP.
    # With no quarantine allowed (max_failed_share 0), that blocks the whole push.
    cfg = (
        settings.CONFIG_FILE.read_text()
        .replace('"there"', '"' + "x" * 60 + '"')
        .replace("max_failed_share: 0.05", "max_failed_share: 0.0")
    )
    bad = tmp_path / "presend.yml"
    bad.write_text(cfg)
    monkeypatch.setenv("PRESEND_CONFIG", str(bad))
    code, log = airflow_run(sandbox)
    assert code != 0
    assert "expect_column_value_lengths_to_be_between" in log
    assert esp_contacts(sandbox) == {}
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        assert con.sql("select status, failed_stage from sync_runs").fetchall() == [
            ("failed", "quality")
        ]


def test_the_socket_guard_is_active_in_every_python_process_it_covers(tmp_path):
    # Proves the guard used above is loaded (without sending anything anywhere).
    env = os.environ | {"PYTHONPATH": str(NETGUARD), "PRESEND_NETGUARD_LOG": str(tmp_path / "g")}
    code = (
        "import socket, sitecustomize as g;"
        "assert socket.socket.connect is g.connect;"
        "assert g._is_loopback(('127.0.0.1', 80)) and g._is_loopback(('::1', 80));"
        "assert not g._is_loopback(('93.184.215.14', 443));"
        "assert not g._is_loopback(('pypi.org',))"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
