"""ESP adapters: chosen by config, credentials from Airflow Connections, the vendors'
rate-limit headers, Retry-After, and the push task's dry run through real Airflow."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
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


def test_vendor_rate_limit_headers_are_read_as_remaining_and_the_time_of_the_reset(monkeypatch):
    monkeypatch.setattr("presend.esp.time.time", lambda: 1_000.0)
    monkeypatch.setattr("presend.esp.time.monotonic", lambda: 50.0)
    # SendGrid's reset is an epoch second; Klaviyo's counts seconds from when the ESP took the
    # request, so it is reckoned from when the request was sent (here at 48.5).
    assert sendgrid_limits({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1003"}, 48.5) == (
        0,
        53.0,
    )
    assert klaviyo_limits({"RateLimit-Remaining": "7", "RateLimit-Reset": "12"}, 48.5) == (
        7,
        60.5,
    )
    assert sendgrid_limits({}, 48.5) is None
    assert klaviyo_limits({"RateLimit-Remaining": "1"}, 48.5) is None


@pytest.fixture
def clock(monkeypatch) -> dict:
    """A fake monotonic clock for the limiter; sleeping moves it on."""
    state = {"now": 100.0, "slept": []}

    def sleep(seconds: float) -> None:
        state["slept"].append(round(seconds, 6))
        state["now"] += seconds

    monkeypatch.setattr("presend.esp.time.monotonic", lambda: state["now"])
    monkeypatch.setattr("presend.esp.time.sleep", sleep)
    return state


def test_after_the_last_request_of_a_window_the_limiter_waits_for_the_reset_per_route(clock):
    limiter = RateLimiter(klaviyo_limits, margin=0.02)

    limiter.observe("POST /jobs", {"RateLimit-Remaining": "0", "RateLimit-Reset": "9"}, 100.0)
    limiter.wait("GET /jobs/{id}")  # another route's window is not used up
    assert clock["slept"] == []
    limiter.wait("POST /jobs")
    assert clock["slept"] == [9.02]
    limiter.wait("POST /jobs")  # the reset has come: no second wait
    assert clock["slept"] == [9.02]


def test_the_limiter_spreads_what_is_left_of_the_window_evenly(clock):
    limiter = RateLimiter(klaviyo_limits)
    # 149 of 150 left with 60 s to go: one request every 0.4 s keeps to the per-minute limit
    # (and far within the per-second burst limit the headers do not advertise).
    limiter.observe("POST /jobs", {"RateLimit-Remaining": "149", "RateLimit-Reset": "60"}, 100.0)
    limiter.wait("POST /jobs")
    assert clock["slept"] == [0.4]


def test_a_slow_request_does_not_push_the_next_window_back(clock):
    """With a 1-request/s limit and requests that take 0.3 s to answer, the next request goes
    1 s (plus the margin) after the last one was sent, not 1 s after its answer came: waiting
    from the answer gave 1.3 s per request, 77% of the limit."""
    limiter = RateLimiter(klaviyo_limits, margin=0.02)
    sends = []
    for _ in range(5):
        limiter.wait("POST /jobs")
        sent_at = clock["now"]
        sends.append(sent_at)
        clock["now"] += 0.3  # the ESP takes the request and answers 0.3 s later
        limiter.observe("POST /jobs", {"RateLimit-Remaining": "0", "RateLimit-Reset": "1"}, sent_at)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sends)]
    assert gaps == [1.02] * 4


def test_a_429_despite_pacing_widens_the_margin_up_to_the_headers_resolution(clock):
    limiter = RateLimiter(klaviyo_limits, margin=0.25)
    empty = {"RateLimit-Remaining": "0", "RateLimit-Reset": "1"}

    for expected in (0.5, 1.0, 1.0):
        limiter.observe("POST /jobs", empty, clock["now"], throttled=True)
        assert limiter.margin("POST /jobs") == expected
    assert limiter.margin("GET /jobs/{id}") == 0.25
    assert limiter.throttled == 3
    limiter.wait("POST /jobs")
    assert clock["slept"] == [2.0]


def test_pacing_keeps_a_slow_esp_at_its_rate_limit_without_a_429(data_dir, sandbox):
    """Against the sandbox ESP: 1 import per second, each taking 0.3 s to be accepted."""
    write_merge_fields(10)
    requests.post(
        f"{sandbox.esp_url}/_sandbox/faults",
        json={"rate_limits": {KLAVIYO_IMPORT: [1, 1]}, "write_latency": 0.3},
        timeout=30,
    ).raise_for_status()
    adapter = make_adapter(
        "klaviyo", sandbox.esp_url, ESP_API_KEY, max_batch_contacts=2, poll_interval=0.01
    )
    sends: list[float] = []

    def note(resp, *args, **kwargs):
        if resp.request.method == "POST":
            sends.append(time.monotonic() - resp.elapsed.total_seconds())

    adapter.http.hooks["response"].append(note)

    result = push.push(adapter)

    assert (result.pushed, result.batches) == (10, 5)
    assert request_counts(sandbox.esp_url)[KLAVIYO_IMPORT] == 5  # not one 429
    # Waiting from the answers would space the imports 1.3 s apart.
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert sum(gaps) / len(gaps) < 1.15, gaps


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
