"""Resumable and exactly-once in effect: SIGKILL the push at random points, then rerun.

The push runs in a child process against the sandbox ESP and is killed with SIGKILL once the
ESP has taken a seeded-random number of batches (plus a seeded-random moment more). A rerun
must leave the ESP exactly as a clean run does, and must not send any contact the ledger
held as acknowledged when it started.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from presend import push, warehouse
from presend.esp import make_adapter
from presend.sandbox.server import ESP_API_KEY, Sandbox

REPO = Path(__file__).resolve().parents[1]
ROWS = 240
PER_BATCH = 12
WRITE = {"sendgrid": "PUT /v3/marketing/contacts", "klaviyo": "POST /api/profile-bulk-import-jobs"}
HELD = {"sendgrid": "/_sandbox/contacts", "klaviyo": "/_sandbox/klaviyo/profiles"}
CHILD = """
import sys
from presend import push
from presend.esp import make_adapter
vendor, url, key, per_batch = sys.argv[1:5]
push.push(make_adapter(vendor, url, key, max_batch_contacts=int(per_batch), poll_interval=0.01))
"""


def rows_for(phase: int) -> list[dict]:
    """Phase 0: every contact new. Phase 1: a third changed, the last 12 removed."""
    rows = []
    for i in range(1, ROWS + 1):
        tier = "gold" if phase and i % 3 == 0 else "silver"
        rows.append(
            {
                "contact_id": f"{i:05d}",
                "EMAIL": f"resume{i}@example.com",
                "FIRST_NAME": f"Name{i}" + ("-v2" if phase and i % 3 == 0 else ""),
                "LOYALTY_TIER": tier,
            }
        )
    return rows[:-12] if phase else rows


def write_merge_fields(rows: list[dict]) -> None:
    with warehouse.connect() as con:
        con.execute(
            "create or replace table esp_merge_fields (contact_id varchar primary key, "
            '"EMAIL" varchar, "FIRST_NAME" varchar, "LOYALTY_TIER" varchar, fields_hash varchar)'
        )
        con.executemany(
            "insert into esp_merge_fields values (?, ?, ?, ?, md5(? || '|' || ? || '|' || ?))",
            [
                [r["contact_id"], *fields, *fields]
                for r in rows
                for fields in [(r["EMAIL"], r["FIRST_NAME"], r["LOYALTY_TIER"])]
            ],
        )


def ledger(vendor: str) -> dict[str, str]:
    with warehouse.connect(read_only=True) as con:
        return dict(
            con.execute(
                "select contact_id, fields_hash from push_ledger where esp = ?", [vendor]
            ).fetchall()
        )


def writes(esp_url: str, vendor: str) -> int:
    return requests.get(f"{esp_url}/_sandbox/requests", timeout=30).json().get(WRITE[vendor], 0)


def held(esp_url: str, vendor: str) -> dict:
    return requests.get(f"{esp_url}{HELD[vendor]}", timeout=30).json()


def push_killed(esp_url: str, vendor: str, rnd: random.Random) -> bool:
    """Start the push in a child and SIGKILL it at a random point; True if it was killed."""
    env = os.environ | {"PYTHONPATH": str(REPO / "plugins")}
    batches_left = -(-push.preview(vendor)["to_send"] // PER_BATCH)
    if batches_left < 2:
        return False
    start = writes(esp_url, vendor)
    target = start + rnd.randint(1, batches_left - 1)
    extra = rnd.uniform(0, 0.02)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, vendor, esp_url, ESP_API_KEY, str(PER_BATCH)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while writes(esp_url, vendor) < target and child.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the push did not reach the kill point in time")
            time.sleep(0.005)
        time.sleep(extra)
        if child.poll() is not None:
            return False
        child.send_signal(signal.SIGKILL)
        return True
    finally:
        child.wait()


def push_recorded(esp_url: str, vendor: str) -> tuple[push.PushResult, set[str]]:
    """A full push in this process; returns its result and every email it sent."""
    adapter = make_adapter(
        vendor, esp_url, ESP_API_KEY, max_batch_contacts=PER_BATCH, poll_interval=0.01
    )
    sent: set[str] = set()

    def record(resp, *args, **kwargs):
        if resp.request.method in ("PUT", "POST") and resp.status_code == 202:
            body = json.loads(resp.request.body)
            if vendor == "sendgrid":
                sent.update(c["email"] for c in body["contacts"])
            else:
                profiles = body["data"]["attributes"]["profiles"]["data"]
                sent.update(p["attributes"]["email"] for p in profiles)

    adapter.http.hooks["response"].append(record)
    return push.push(adapter), sent


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """What the ESP holds after each phase of uninterrupted pushes, per vendor."""
    out: dict[str, list[dict]] = {}
    data = tmp_path_factory.mktemp("clean")
    env = {"PRESEND_DATA_DIR": str(data), "PRESEND_TASK_POOL": "warehouse"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with Sandbox(contacts=10) as sb:
            for vendor in WRITE:
                out[vendor] = []
                for phase in (0, 1):
                    write_merge_fields(rows_for(phase))
                    push_recorded(sb.esp_url, vendor)
                    out[vendor].append(held(sb.esp_url, vendor))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


@pytest.mark.parametrize(
    ("vendor", "seed"),
    [("sendgrid", 1), ("sendgrid", 2), ("sendgrid", 3), ("klaviyo", 4), ("klaviyo", 5)],
)
def test_sigkilled_pushes_end_like_a_clean_run_and_never_resend_acknowledged_contacts(
    vendor, seed, data_dir, sandbox, clean_runs
):
    rnd = random.Random(seed)
    for phase in (0, 1):
        write_merge_fields(rows_for(phase))
        killed = 0
        for _ in range(rnd.randint(1, 3)):
            killed += push_killed(sandbox.esp_url, vendor, rnd)
        assert killed, "the push finished before it could be killed: the test proved nothing"

        acknowledged = ledger(vendor)
        result, sent = push_recorded(sandbox.esp_url, vendor)

        current = {r["contact_id"]: r for r in rows_for(phase)}
        with warehouse.connect(read_only=True) as con:
            hashes = dict(
                con.execute("select contact_id, fields_hash from esp_merge_fields").fetchall()
            )
        # A contact acknowledged with the values it has now is never sent again.
        settled = {
            current[cid]["EMAIL"]
            for cid, h in acknowledged.items()
            if cid in current and hashes[cid] == h
        }
        assert not sent & settled
        assert result.rejected == 0
        assert held(sandbox.esp_url, vendor) == clean_runs[vendor][phase]
        assert ledger(vendor) == {cid: hashes[cid] for cid in current}
        with warehouse.connect(read_only=True) as con:
            assert con.execute("select count(*) from push_jobs").fetchone()[0] == 0
