"""ESP adapters: chosen by config, credentials from Airflow Connections, the vendors'
rate-limit headers, Retry-After, and the push task's dry run through real Airflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from presend import cli, esp, push, settings, warehouse
from presend.esp import RateLimiter, klaviyo_limits, make_adapter, sendgrid_limits
from presend.esp.klaviyo import Klaviyo
from presend.esp.sendgrid import SendGrid
from presend.sandbox.esp import KLAVIYO_IMPORT
from presend.sandbox.server import ESP_API_KEY

ROWS = 8


def write_merge_fields(n: int = ROWS) -> list[dict]:
    rows = [
        {
            "contact_id": f"{i:03d}",
            "EMAIL": f"adapter{i}@example.com",
            "FIRST_NAME": f"Name{i}",
            "LOYALTY_TIER": "gold",
        }
        for i in range(1, n + 1)
    ]
    with warehouse.connect() as con:
        con.execute(
            "create or replace table esp_merge_fields (contact_id varchar primary key, "
            '"EMAIL" varchar, "FIRST_NAME" varchar, "LOYALTY_TIER" varchar, fields_hash varchar)'
        )
        con.executemany(
            "insert into esp_merge_fields values (?, ?, ?, ?, md5(?))",
            [[*r.values(), json.dumps(r)] for r in rows],
        )
    return rows


def request_counts(esp_url: str) -> dict[str, int]:
    return requests.get(f"{esp_url}/_sandbox/requests", timeout=30).json()


# ---------------------------------------------------------------------------------------------
# choosing the adapter, credentials
# ---------------------------------------------------------------------------------------------


def _conn(host: str, port: int, key: str) -> str:
    return json.dumps(
        {"conn_type": "http", "host": host, "port": port, "schema": "http", "password": key}
    )


def test_the_vendor_picks_the_adapter_and_its_airflow_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PRESEND_ESP", _conn("sg.internal", 8443, "SG.key"))
    monkeypatch.setenv("AIRFLOW_CONN_PRESEND_KLAVIYO", _conn("kl.internal", 9443, "pk_key"))

    sendgrid = esp.from_airflow("sendgrid")
    klaviyo = esp.from_airflow("klaviyo")

    assert isinstance(sendgrid, SendGrid)
    assert sendgrid.client.base_url == "http://sg.internal:8443"
    assert sendgrid.http.headers["Authorization"] == "Bearer SG.key"
    assert isinstance(klaviyo, Klaviyo)
    assert klaviyo.client.base_url == "http://kl.internal:9443"
    assert klaviyo.http.headers["Authorization"] == "Klaviyo-API-Key pk_key"
    assert klaviyo.http.headers["revision"]
    with pytest.raises(ValueError, match="unknown ESP vendor"):
        make_adapter("mailchimp", "http://x", "k")


@pytest.mark.parametrize(
    ("vendor", "limits"),
    [("sendgrid", (30_000, 6_000_000)), ("klaviyo", (10_000, 5_000_000))],
)
def test_batch_limits_are_capped_at_the_vendors_own(vendor, limits):
    adapter = make_adapter(vendor, "http://x", "k", max_batch_contacts=10**6, max_batch_bytes=10**9)
    assert (adapter.max_batch_contacts, adapter.max_batch_bytes) == limits
    smaller = make_adapter(vendor, "http://x", "k", max_batch_contacts=500, max_batch_bytes=10**5)
    assert (smaller.max_batch_contacts, smaller.max_batch_bytes) == (500, 10**5)


# ---------------------------------------------------------------------------------------------
# rate-limit headers
# ---------------------------------------------------------------------------------------------


def test_vendor_rate_limit_headers_are_read_as_remaining_and_seconds_to_reset(monkeypatch):
    monkeypatch.setattr("presend.esp.time.time", lambda: 1_000.0)
    assert sendgrid_limits({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1003"}) == (
        0,
        3.0,
    )
    assert klaviyo_limits({"RateLimit-Remaining": "7", "RateLimit-Reset": "12"}) == (7, 12.0)
    assert sendgrid_limits({}) is None
    assert klaviyo_limits({"RateLimit-Remaining": "1"}) is None


def test_the_limiter_waits_for_the_reset_only_when_the_bucket_is_empty(monkeypatch):
    slept: list[float] = []
    clock = [100.0]
    monkeypatch.setattr("presend.esp.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("presend.esp.time.sleep", slept.append)
    limiter = RateLimiter(klaviyo_limits)

    limiter.observe("POST /jobs", {"RateLimit-Remaining": "3", "RateLimit-Reset": "9"})
    limiter.wait("POST /jobs")
    assert slept == []

    limiter.observe("POST /jobs", {"RateLimit-Remaining": "0", "RateLimit-Reset": "9"})
    limiter.wait("GET /jobs/{id}")  # another route's bucket is not empty
    assert slept == []
    limiter.wait("POST /jobs")
    assert slept == [9.0]
    limiter.wait("POST /jobs")  # the wait used the reset up
    assert slept == [9.0]


def test_klaviyo_push_retries_a_429_after_retry_after_and_then_keeps_within_the_limit(
    data_dir, sandbox
):
    rows = write_merge_fields()
    # Another client of the account used the window up: the push's first POST meets a 429.
    requests.post(
        f"{sandbox.esp_url}/_sandbox/faults",
        json={"throttle_next": 1, "rate_limits": {KLAVIYO_IMPORT: [1, 1]}},
        timeout=30,
    ).raise_for_status()
    adapter = make_adapter(
        "klaviyo", sandbox.esp_url, ESP_API_KEY, max_batch_contacts=3, poll_interval=0.01
    )
    seen: list[int] = []
    adapter.http.hooks["response"].append(lambda r, *a, **k: seen.append(r.status_code))

    result = push.push(adapter)

    assert (result.pushed, result.batches) == (ROWS, 3)
    held = requests.get(f"{sandbox.esp_url}/_sandbox/klaviyo/profiles", timeout=30).json()
    assert {r["EMAIL"] for r in rows} == held.keys()
    # The 429 was retried inside the HTTP client (the caller saw only successes): one
    # request more than batches reached the ESP.
    assert 429 not in seen
    assert request_counts(sandbox.esp_url)[KLAVIYO_IMPORT] == result.batches + 1


# ---------------------------------------------------------------------------------------------
# the push task in Airflow: dry run and vendor from config
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def airflow_task(tmp_path, data_dir, monkeypatch, migrated_airflow_home):
    """Run one task of presend_sync with `airflow tasks test`; returns (exit code, output)."""
    monkeypatch.delenv("PRESEND_TASK_POOL")
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)

    def run(task_id: str, params: dict, env: dict[str, str]) -> tuple[int, str]:
        cmd = [str(Path(sys.executable).with_name("airflow")), "tasks", "test"]
        cmd += ["presend_sync", task_id, "-t", json.dumps(params)]
        proc = subprocess.run(
            cmd,
            env=cli.airflow_env(home) | env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        return proc.returncode, proc.stdout + proc.stderr

    return run


def test_dry_run_param_previews_the_push_without_any_request_to_the_esp(airflow_task, sandbox):
    rows = write_merge_fields()

    code, out = airflow_task("push_merge_fields", {"dry_run": True}, sandbox.connection_env())

    assert code == 0, out[-4000:]
    assert f"would send {ROWS} contacts" in out
    assert f"new        {ROWS:>8}" in out
    assert request_counts(sandbox.esp_url) == {}
    assert not any(r["EMAIL"] in out for r in rows)
    with warehouse.connect(read_only=True) as con:
        tables = {
            t for (t,) in con.execute("select table_name from information_schema.tables").fetchall()
        }
    assert "push_ledger" not in tables


def test_the_push_task_sends_to_the_vendor_named_in_the_config(airflow_task, sandbox, tmp_path):
    rows = write_merge_fields()
    doc = yaml.safe_load(settings.CONFIG_FILE.read_text())
    doc["esp"]["vendor"] = "klaviyo"
    config_file = tmp_path / "presend.yml"
    config_file.write_text(yaml.safe_dump(doc))
    conn = json.loads(sandbox.connection_env()["AIRFLOW_CONN_PRESEND_ESP"])
    env = {
        "PRESEND_CONFIG": str(config_file),
        "AIRFLOW_CONN_PRESEND_KLAVIYO": json.dumps(conn),
    }

    code, out = airflow_task("push_merge_fields", {"dry_run": False}, env)

    assert code == 0, out[-4000:]
    held = requests.get(f"{sandbox.esp_url}/_sandbox/klaviyo/profiles", timeout=30).json()
    assert {r["EMAIL"] for r in rows} == held.keys()
    assert "PUT /v3/marketing/contacts" not in request_counts(sandbox.esp_url)
