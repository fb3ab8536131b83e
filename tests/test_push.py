"""The push stage: changed merge fields to the ESP in batches, with a ledger and rejects."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from presend import push, warehouse
from presend.esp import Change, make_adapter
from presend.esp.sendgrid import SendGrid
from presend.sandbox.crm import FIRST_NAMES, TIERS
from presend.sandbox.esp import FIELD_MAX_LENGTH, KLAVIYO_ATTRIBUTE_MAX_LENGTH
from presend.sandbox.server import ESP_API_KEY

REPO = Path(__file__).resolve().parents[1]
MERGE_FIELDS = ["EMAIL", "FIRST_NAME", "LOYALTY_TIER"]
ROWS = 12
PUT = "PUT /v3/marketing/contacts"  # the upsert, as /_sandbox/requests counts it


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def body_bytes(batch: list[tuple[str, dict]]) -> int:
    """Bytes of the compact request body that carries `batch`."""
    body = {"contacts": [rec for _, rec in batch]}
    return len(json.dumps(body, separators=(",", ":")).encode())


def make_row(i: int, **values: str) -> dict:
    row = {
        "contact_id": f"{i:04d}",
        "EMAIL": f"contact{i}@example.com",
        "FIRST_NAME": FIRST_NAMES[i % len(FIRST_NAMES)],
        "LOYALTY_TIER": TIERS[i % len(TIERS)],
    } | values
    row["fields_hash"] = hashlib.md5(
        json.dumps([row[f] for f in MERGE_FIELDS]).encode()
    ).hexdigest()
    return row


def fields_of(row: dict) -> dict[str, str]:
    return {f: row[f] for f in MERGE_FIELDS}


def write_merge_fields(rows: list[dict]) -> None:
    """The esp_merge_fields table the dbt build would produce, written directly."""
    with warehouse.connect() as con:
        con.execute(
            "create or replace table esp_merge_fields (contact_id varchar primary key, "
            '"EMAIL" varchar, "FIRST_NAME" varchar, "LOYALTY_TIER" varchar, fields_hash varchar)'
        )
        if not rows:
            return
        con.executemany(
            "insert into esp_merge_fields values (?, ?, ?, ?, ?)",
            [[r["contact_id"], *(r[f] for f in MERGE_FIELDS), r["fields_hash"]] for r in rows],
        )


def query(sql: str, params: list | None = None) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def ledger() -> dict[str, str]:
    return dict(query("select contact_id, fields_hash from push_ledger where esp = 'sendgrid'"))


def held(esp_url: str) -> dict[str, dict]:
    resp = requests.get(f"{esp_url}/_sandbox/contacts", timeout=30)
    resp.raise_for_status()
    return resp.json()


def request_counts(esp_url: str) -> dict[str, int]:
    resp = requests.get(f"{esp_url}/_sandbox/requests", timeout=30)
    resp.raise_for_status()
    return resp.json()


def custom_field_names(esp_url: str) -> list[str]:
    resp = requests.get(
        f"{esp_url}/v3/marketing/field_definitions",
        headers={"Authorization": f"Bearer {ESP_API_KEY}"},
        timeout=30,
    )
    resp.raise_for_status()
    return [f["name"] for f in resp.json()["custom_fields"]]


def assert_held(esp_url: str, rows: list[dict]) -> None:
    holding = held(esp_url)
    for r in rows:
        contact = holding[r["EMAIL"]]
        assert contact["first_name"] == r["FIRST_NAME"]
        assert contact["custom_fields"] == {"LOYALTY_TIER": r["LOYALTY_TIER"]}


class Wire:
    """The PUT requests an adapter sends, as they went over the wire."""

    def __init__(self, adapter: SendGrid) -> None:
        self.bodies: list[bytes] = []
        self.job_ids: list[str] = []
        adapter.http.hooks["response"].append(self._record)

    def _record(self, resp, *args, **kwargs) -> None:
        if resp.request.method == "PUT":
            self.bodies.append(resp.request.body)
            self.job_ids.append(resp.json().get("job_id"))

    def emails(self, n: int = -1) -> list[str]:
        return [c["email"] for c in json.loads(self.bodies[n])["contacts"]]


@pytest.fixture
def wire(sendgrid) -> Wire:
    return Wire(sendgrid)


@pytest.fixture
def rows(data_dir) -> list[dict]:
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    write_merge_fields(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# batches()
# ---------------------------------------------------------------------------------------------


def test_batches_respect_count_and_byte_limits_keep_order_and_lose_nothing():
    rnd = random.Random(20260101)
    for _ in range(300):
        records = [
            (str(i), {"email": f"c{i}@example.com", "first_name": "x" * rnd.randint(0, 120)})
            for i in range(rnd.randint(0, 60))
        ]
        max_count = rnd.randint(1, 12)
        max_bytes = rnd.randint(push.ENVELOPE_BYTES, 1500)
        out = list(push.batches(records, max_count, max_bytes))

        assert [r for batch in out for r in batch] == records
        for batch in out:
            assert 1 <= len(batch) <= max_count
            if len(batch) > 1:
                assert body_bytes(batch) <= max_bytes
            # A record too big for any batch goes alone rather than being dropped.
            for r in batch:
                if body_bytes([r]) > max_bytes:
                    assert batch == [r]


def test_an_oversize_record_gets_a_batch_of_its_own():
    small = [(str(i), {"email": f"c{i}@example.com"}) for i in range(4)]
    huge = ("huge", {"email": "h@example.com", "first_name": "x" * 5000})
    records = [small[0], small[1], huge, small[2], small[3]]
    out = list(push.batches(records, max_count=10, max_bytes=1000))
    assert out == [[small[0], small[1]], [huge], [small[2], small[3]]]


def test_no_records_make_no_batches():
    assert list(push.batches([], 10, 1000)) == []


# ---------------------------------------------------------------------------------------------
# push() against the sandbox ESP
# ---------------------------------------------------------------------------------------------


def test_first_push_sends_every_row_and_the_esp_holds_their_merge_fields(
    rows, sandbox, sendgrid, wire
):
    result = push.push(sendgrid)

    assert (result.candidates, result.pushed, result.skipped, result.rejected) == (
        len(rows),
        len(rows),
        0,
        0,
    )
    assert result.batches == len(wire.bodies) == 1
    assert sorted(wire.emails()) == sorted(r["EMAIL"] for r in rows)
    assert held(sandbox.esp_url).keys() == {r["EMAIL"] for r in rows}
    assert_held(sandbox.esp_url, rows)
    assert custom_field_names(sandbox.esp_url) == ["LOYALTY_TIER"]
    assert ledger() == {r["contact_id"]: r["fields_hash"] for r in rows}


def test_a_second_push_sends_nothing_and_reports_every_row_skipped(rows, sandbox, sendgrid, wire):
    push.push(sendgrid)
    counts, holding = request_counts(sandbox.esp_url), held(sandbox.esp_url)

    again = push.push(sendgrid)

    assert (again.candidates, again.pushed, again.skipped, again.batches) == (
        len(rows),
        0,
        len(rows),
        0,
    )
    assert request_counts(sandbox.esp_url).get(PUT) == counts[PUT] == 1
    assert len(wire.bodies) == 1
    assert held(sandbox.esp_url) == holding


def test_changing_one_row_sends_exactly_that_row(rows, sandbox, sendgrid):
    push.push(sendgrid)
    puts_before = request_counts(sandbox.esp_url)[PUT]
    old = rows[4]
    tiers = [t for t in TIERS if t != old["LOYALTY_TIER"]]
    changed = make_row(int(old["contact_id"]), LOYALTY_TIER=tiers[0])
    rows[4] = changed
    write_merge_fields(rows)
    # The next sync run builds its own adapter: it finds the custom field by name.
    next_run = SendGrid(sandbox.esp_url, ESP_API_KEY, poll_interval=0.01)
    wire = Wire(next_run)

    result = push.push(next_run)

    assert (result.pushed, result.skipped, result.rejected) == (1, len(rows) - 1, 0)
    assert request_counts(sandbox.esp_url)[PUT] == puts_before + 1
    assert wire.emails() == [changed["EMAIL"]]
    assert_held(sandbox.esp_url, rows)
    assert ledger()[changed["contact_id"]] == changed["fields_hash"]
    assert custom_field_names(sandbox.esp_url) == ["LOYALTY_TIER"]


def test_a_permanently_rejected_row_is_kept_with_the_esp_reason_and_not_resent(
    data_dir, sandbox, sendgrid, wire
):
    too_long = "x" * (FIELD_MAX_LENGTH["first_name"] + 1)
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    rows[2] = make_row(3, EMAIL="contact3-at-example.com")
    rows[6] = make_row(7, FIRST_NAME=too_long)
    bad = {rows[2]["contact_id"]: rows[2], rows[6]["contact_id"]: rows[6]}
    good = [r for r in rows if r["contact_id"] not in bad]
    write_merge_fields(rows)

    result = push.push(sendgrid)

    assert (result.pushed, result.rejected) == (len(good), len(bad))
    # The reasons are the ones the ESP gave in the import job's errors.
    (job_id,) = wire.job_ids
    errors = requests.get(f"{sandbox.esp_url}/_sandbox/jobs/{job_id}/errors", timeout=30).json()
    esp_reason = {e["email"]: e["message"] for e in errors}
    rejects = query(
        "select contact_id, fields_hash, reason, permanent from push_rejects where esp = 'sendgrid'"
    )
    assert {r[0] for r in rejects} == bad.keys()
    for cid, fields_hash, reason, permanent in rejects:
        assert fields_hash == bad[cid]["fields_hash"]
        assert reason == esp_reason[bad[cid]["EMAIL"]]
        assert permanent is True
    assert ledger() == {r["contact_id"]: r["fields_hash"] for r in good}
    assert held(sandbox.esp_url).keys() == {r["EMAIL"] for r in good}

    # Unchanged, the rejected rows are not sent again.
    puts = request_counts(sandbox.esp_url)[PUT]
    again = push.push(sendgrid)
    assert (again.pushed, again.rejected, again.skipped) == (0, 0, len(rows))
    assert request_counts(sandbox.esp_url)[PUT] == puts
    assert len(query("select * from push_rejects")) == len(bad)

    # Fixed upstream (a new hash), the row is sent once more and accepted.
    fixed = make_row(3)
    rows[2] = fixed
    write_merge_fields(rows)
    third = push.push(sendgrid)
    assert (third.pushed, third.rejected) == (1, 0)
    assert wire.emails() == [fixed["EMAIL"]]
    assert ledger()[fixed["contact_id"]] == fixed["fields_hash"]
    assert rows[6]["contact_id"] not in ledger()


def test_push_never_changes_subscription_status(rows, sandbox, sendgrid):
    push.push(sendgrid)
    target = rows[1]
    resp = requests.post(
        f"{sandbox.esp_url}/_sandbox/unsubscribe", json={"email": target["EMAIL"]}, timeout=30
    )
    resp.raise_for_status()
    rows[1] = make_row(int(target["contact_id"]), FIRST_NAME=f"{target['FIRST_NAME']}-renamed")
    write_merge_fields(rows)

    result = push.push(sendgrid)

    assert result.pushed == 1
    holding = held(sandbox.esp_url)
    assert holding[target["EMAIL"]]["first_name"] == rows[1]["FIRST_NAME"]
    assert holding[target["EMAIL"]]["subscribed"] is False
    assert all(c["subscribed"] for e, c in holding.items() if e != target["EMAIL"])


def test_request_bodies_on_the_wire_stay_within_the_batch_limits(data_dir, sandbox):
    rows = [make_row(i) for i in range(1, 61)]
    write_merge_fields(rows)
    probe = SendGrid(sandbox.esp_url, ESP_API_KEY)
    probe.field_ids = {"LOYALTY_TIER": "e1_T"}  # only to size records as the adapter builds them
    records = [
        (r["contact_id"], probe.record(Change(r["contact_id"], r["EMAIL"], fields_of(r))))
        for r in rows
    ]
    max_bytes = body_bytes(records[:15])  # room for about 15 contacts per request
    adapter = SendGrid(
        sandbox.esp_url,
        ESP_API_KEY,
        max_batch_contacts=1000,
        max_batch_bytes=max_bytes,
        poll_interval=0.01,
    )
    wire = Wire(adapter)

    result = push.push(adapter)

    assert result.pushed == len(rows)
    assert result.batches == len(wire.bodies) > 1
    assert max(len(body) for body in wire.bodies) <= max_bytes
    sent = [e for n in range(len(wire.bodies)) for e in wire.emails(n)]
    assert sent == [r["EMAIL"] for r in sorted(rows, key=lambda r: r["contact_id"])]
    assert_held(sandbox.esp_url, rows)


def test_push_splits_by_contact_count(data_dir, sandbox):
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    write_merge_fields(rows)
    per_batch = 5
    adapter = SendGrid(
        sandbox.esp_url, ESP_API_KEY, max_batch_contacts=per_batch, poll_interval=0.01
    )
    wire = Wire(adapter)

    result = push.push(adapter)

    assert result.batches == len(wire.bodies) == math.ceil(len(rows) / per_batch)
    assert all(len(wire.emails(n)) <= per_batch for n in range(len(wire.bodies)))
    assert request_counts(sandbox.esp_url)[PUT] == result.batches
    assert_held(sandbox.esp_url, rows)


# ---------------------------------------------------------------------------------------------
# both vendors: change-only, partial updates, clears, quarantine, faults, safety
# ---------------------------------------------------------------------------------------------

WRITE = {"sendgrid": PUT, "klaviyo": "POST /api/profile-bulk-import-jobs"}
TOO_LONG = {
    "sendgrid": FIELD_MAX_LENGTH["first_name"] + 1,
    "klaviyo": KLAVIYO_ATTRIBUTE_MAX_LENGTH + 1,
}


class Esp:
    """One vendor in the sandbox ESP: its adapter, the write bodies it sent, what it holds."""

    def __init__(self, vendor: str, esp_url: str, **kwargs) -> None:
        self.vendor, self.url = vendor, esp_url
        self.adapter = make_adapter(vendor, esp_url, ESP_API_KEY, poll_interval=0.01, **kwargs)
        self.bodies: list[dict] = []
        self.adapter.http.hooks["response"].append(self._record)

    def _record(self, resp, *args, **kwargs) -> None:
        if resp.request.method in ("PUT", "POST") and resp.status_code == 202:
            self.bodies.append(json.loads(resp.request.body))

    def records(self, n: int = -1) -> list[dict]:
        """The records of the n-th write request, as {email, FIELD: value, ...} (None: clear)."""
        body = self.bodies[n]
        if self.vendor == "sendgrid":
            names = {fid: name for name, fid in self.adapter.field_ids.items()}
            out = []
            for rec in body["contacts"]:
                flat = {"email": rec["email"]}
                if "first_name" in rec:
                    flat["FIRST_NAME"] = rec["first_name"]
                flat |= {names[k]: v for k, v in rec.get("custom_fields", {}).items()}
                out.append(flat)
            return out
        out = []
        for prof in body["data"]["attributes"]["profiles"]["data"]:
            attrs = prof["attributes"]
            flat = {"email": attrs["email"]} | attrs.get("properties", {})
            if "first_name" in attrs:
                flat["FIRST_NAME"] = attrs["first_name"]
            unset = prof.get("meta", {}).get("patch_properties", {}).get("unset", [])
            flat |= dict.fromkeys(unset)
            out.append(flat)
        return out

    def held(self) -> dict[str, dict]:
        """What the ESP holds per email: merge fields by name, and `subscribed`."""
        if self.vendor == "sendgrid":
            return {
                email: {"FIRST_NAME": c.get("first_name"), **c["custom_fields"]}
                | {"subscribed": c["subscribed"]}
                for email, c in held(self.url).items()
            }
        resp = requests.get(f"{self.url}/_sandbox/klaviyo/profiles", timeout=30)
        return {
            email: {"FIRST_NAME": p.get("first_name"), **p["properties"]}
            | {"subscribed": p["subscribed"]}
            for email, p in resp.json().items()
        }

    def writes(self) -> int:
        return request_counts(self.url).get(WRITE[self.vendor], 0)

    def total_requests(self) -> int:
        return sum(request_counts(self.url).values())

    def set_subscribed(self, email: str, subscribed: bool) -> None:
        action = "subscribe" if subscribed else "unsubscribe"
        requests.post(
            f"{self.url}/_sandbox/{action}",
            json={"vendor": self.vendor, "email": email},
            timeout=30,
        ).raise_for_status()


def vendor_ledger(vendor: str) -> dict[str, str]:
    return dict(query("select contact_id, fields_hash from push_ledger where esp = ?", [vendor]))


def assert_esp_holds(esp: Esp, rows: list[dict]) -> None:
    holding = esp.held()
    for r in rows:
        got = holding[r["EMAIL"]]
        assert (got["FIRST_NAME"], got["LOYALTY_TIER"]) == (r["FIRST_NAME"], r["LOYALTY_TIER"])


@pytest.fixture(params=["sendgrid", "klaviyo"])
def esp(request, sandbox) -> Esp:
    return Esp(request.param, sandbox.esp_url)


def test_a_change_sends_only_the_changed_fields_of_the_changed_contacts(rows, esp):
    push.push(esp.adapter)
    assert_esp_holds(esp, rows)
    rows[3] = make_row(4, FIRST_NAME="Renamed")
    rows[7] = make_row(8, LOYALTY_TIER="platinum")
    write_merge_fields(rows)
    writes = esp.writes()

    result = push.push(esp.adapter)

    assert (result.new, result.changed, result.unchanged, result.pushed) == (0, 2, ROWS - 2, 2)
    assert esp.writes() == writes + 1
    assert sorted(esp.records(), key=lambda r: r["email"]) == [
        {"email": rows[3]["EMAIL"], "FIRST_NAME": "Renamed"},
        {"email": rows[7]["EMAIL"], "LOYALTY_TIER": "platinum"},
    ]
    assert_esp_holds(esp, rows)
    assert vendor_ledger(esp.vendor) == {r["contact_id"]: r["fields_hash"] for r in rows}


def test_a_run_with_no_changes_makes_no_request_at_all(rows, esp):
    push.push(esp.adapter)
    before, holding = esp.total_requests(), esp.held()

    again = push.push(esp.adapter)

    assert (again.pushed, again.unchanged, again.batches) == (0, ROWS, 0)
    assert esp.total_requests() == before
    assert esp.held() == holding


def test_contacts_removed_from_merge_fields_get_their_fields_cleared(rows, esp):
    push.push(esp.adapter)
    gone = rows.pop(5)
    write_merge_fields(rows)

    result = push.push(esp.adapter)

    assert (result.cleared, result.pushed, result.changed) == (1, 1, 0)
    (record,) = esp.records()
    assert record["email"] == gone["EMAIL"]
    cleared = esp.held()[gone["EMAIL"]]
    assert not cleared["FIRST_NAME"]
    assert not cleared.get("LOYALTY_TIER")
    assert gone["contact_id"] not in vendor_ledger(esp.vendor)
    assert_esp_holds(esp, rows)
    # Cleared once: the next run sends nothing.
    writes = esp.writes()
    assert push.push(esp.adapter).pushed == 0
    assert esp.writes() == writes


def test_quarantined_contacts_keep_their_previous_values_and_are_counted(rows, esp):
    push.push(esp.adapter)
    before = esp.held()
    rows[0] = make_row(1, FIRST_NAME="Suspicious")
    rows[1] = make_row(2, FIRST_NAME="Fine")
    write_merge_fields(rows)
    with warehouse.connect() as con:
        con.execute(
            "create or replace table quarantined_contacts "
            "(contact_id varchar, reasons varchar, run_id varchar)"
        )
        con.execute(
            "insert into quarantined_contacts values (?, 'first_name_looks_odd', 'r1')",
            [rows[0]["contact_id"]],
        )

    result = push.push(esp.adapter)

    assert (result.quarantined, result.changed, result.pushed) == (1, 1, 1)
    assert esp.held()[rows[0]["EMAIL"]] == before[rows[0]["EMAIL"]]
    assert esp.held()[rows[1]["EMAIL"]]["FIRST_NAME"] == "Fine"
    # Released by the next gate run, the contact goes out.
    with warehouse.connect() as con:
        con.execute("delete from quarantined_contacts")
    assert push.push(esp.adapter).pushed == 1
    assert esp.held()[rows[0]["EMAIL"]]["FIRST_NAME"] == "Suspicious"


def test_a_push_never_changes_subscription_status(rows, esp):
    push.push(esp.adapter)
    unsubscribed, subscribed = rows[1]["EMAIL"], rows[2]["EMAIL"]
    esp.set_subscribed(unsubscribed, False)
    esp.set_subscribed(subscribed, True)
    status = {e: c["subscribed"] for e, c in esp.held().items()}
    rows[1] = make_row(2, FIRST_NAME="Changed")
    rows[2] = make_row(3, FIRST_NAME="Changed")
    write_merge_fields(rows)
    del rows[4]  # and a clear
    write_merge_fields(rows)

    result = push.push(esp.adapter)

    assert (result.pushed, result.cleared) == (3, 1)
    after = esp.held()
    assert after[unsubscribed]["FIRST_NAME"] == "Changed"
    assert {e: c["subscribed"] for e, c in after.items()} == status
    assert after[unsubscribed]["subscribed"] is False
    assert after[subscribed]["subscribed"] is True


def test_rejections_keep_the_esp_reason_transient_ones_retry_permanent_ones_do_not(
    data_dir, sandbox, esp
):
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    rows[2] = make_row(3, EMAIL="contact3-at-example.com")
    rows[6] = make_row(7, FIRST_NAME="x" * TOO_LONG[esp.vendor])
    write_merge_fields(rows)
    busy = rows[9]
    requests.post(
        f"{sandbox.esp_url}/_sandbox/faults",
        json={"transient_rejects": {busy["EMAIL"]: 1}},
        timeout=30,
    ).raise_for_status()

    first = push.push(esp.adapter)

    assert (first.pushed, first.rejected) == (ROWS - 3, 3)
    rejects = {
        cid: (reason, permanent)
        for cid, reason, permanent in query(
            "select contact_id, reason, permanent from push_rejects"
        )
    }
    assert rejects[rows[2]["contact_id"]][1] is True
    assert "invalid email" in rejects[rows[2]["contact_id"]][0]
    assert rejects[rows[6]["contact_id"]][1] is True
    assert "longer than" in rejects[rows[6]["contact_id"]][0]
    assert rejects[busy["contact_id"]] == (rejects[busy["contact_id"]][0], False)
    assert "retry" in rejects[busy["contact_id"]][0]

    second = push.push(esp.adapter)

    # Only the transient one went again, and this time it was accepted.
    assert (second.pushed, second.rejected, second.given_up) == (1, 0, 2)
    assert [r["email"] for r in esp.records()] == [busy["EMAIL"]]
    assert esp.held()[busy["EMAIL"]]["FIRST_NAME"] == busy["FIRST_NAME"]
    assert set(vendor_ledger(esp.vendor)) == {
        r["contact_id"] for r in rows if r["contact_id"] not in ("0003", "0007")
    }
    writes = esp.writes()
    assert push.push(esp.adapter).pushed == 0
    assert esp.writes() == writes


def test_a_record_rejected_transiently_every_time_is_given_up_after_the_cap(data_dir, sandbox, esp):
    rows = [make_row(1), make_row(2)]
    write_merge_fields(rows)
    requests.post(
        f"{sandbox.esp_url}/_sandbox/faults",
        json={"transient_rejects": {rows[0]["EMAIL"]: 1000}},
        timeout=30,
    ).raise_for_status()
    for _ in range(push.MAX_TRANSIENT_ATTEMPTS):
        assert push.push(esp.adapter).rejected == 1
    writes = esp.writes()

    last = push.push(esp.adapter)

    assert (last.given_up, last.rejected, last.pushed) == (1, 0, 0)
    assert esp.writes() == writes


def test_push_rides_out_5xx_bursts_and_keeps_within_the_rate_limit(data_dir, sandbox):
    esp = Esp("sendgrid", sandbox.esp_url, max_batch_contacts=4)
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    write_merge_fields(rows)
    requests.post(
        f"{sandbox.esp_url}/_sandbox/faults",
        json={"rate_limits": {PUT: [1, 1]}, "fail_next": 3},
        timeout=30,
    ).raise_for_status()

    result = push.push(esp.adapter)

    assert (result.pushed, result.batches) == (ROWS, 3)
    assert_esp_holds(esp, rows)
    # Waiting on X-RateLimit-Remaining/Reset, the adapter never ran into a 429: one PUT per
    # batch reached the ESP (the 503s hit the first requests, which were retried).
    puts = request_counts(sandbox.esp_url)[PUT]
    assert puts - result.batches <= 3
    assert esp.adapter.client.limiter.waited > 0


def test_the_next_batch_goes_out_while_the_last_import_job_is_still_running(data_dir, sandbox):
    """Jobs are collected in the background: a push is not held up by each job's processing."""
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    write_merge_fields(rows)
    esp = Esp("klaviyo", sandbox.esp_url, max_batch_contacts=4)
    esp.adapter.poll_interval = 0.5  # every job is still queued for half a second
    seen: list[tuple[str, str]] = []
    esp.adapter.http.hooks["response"].append(
        lambda r, *a, **k: seen.append((r.request.method, r.json()["data"]["attributes"]["status"]))
    )

    result = push.push(esp.adapter)

    assert (result.pushed, result.batches) == (ROWS, 3)
    assert_esp_holds(esp, rows)
    first_complete = seen.index(("GET", "complete"))
    assert [m for m, _ in seen[:first_complete]].count("POST") > 1, seen
    assert vendor_ledger("klaviyo") == {r["contact_id"]: r["fields_hash"] for r in rows}


def test_a_crash_after_submitting_is_recovered_without_sending_again(data_dir, sandbox):
    rows = [make_row(i) for i in range(1, ROWS + 1)]
    write_merge_fields(rows)
    crashing = Esp("klaviyo", sandbox.esp_url, max_batch_contacts=5)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the ESP took the job

    crashing.adapter.collect = die
    with pytest.raises(KeyboardInterrupt):
        push.push(crashing.adapter)
    # Every job the ESP took before the crash is known (several are collected at a time).
    submitted = len(crashing.bodies)
    assert submitted >= 1
    assert query("select count(*) from push_jobs")[0][0] == submitted
    assert vendor_ledger("klaviyo") == {}

    rerun = Esp("klaviyo", sandbox.esp_url, max_batch_contacts=5)
    result = push.push(rerun.adapter)

    assert result.recovered_jobs == submitted
    assert result.pushed == ROWS
    sent_again = {r["email"] for n in range(len(rerun.bodies)) for r in rerun.records(n)}
    taken = {r["email"] for n in range(submitted) for r in crashing.records(n)}
    assert not sent_again & taken
    assert_esp_holds(rerun, rows)
    assert query("select count(*) from push_jobs")[0][0] == 0


def test_an_empty_merge_fields_table_never_clears_every_contact(rows, esp):
    push.push(esp.adapter)
    write_merge_fields([])
    writes = esp.writes()
    with pytest.raises(push.PushSafetyError, match="refusing"):
        push.push(esp.adapter)
    assert esp.writes() == writes
    assert_esp_holds(esp, rows)


# ---------------------------------------------------------------------------------------------
# preview (dry run)
# ---------------------------------------------------------------------------------------------


def test_preview_counts_and_samples_diffs_without_any_request_and_without_emails(rows, esp):
    push.push(esp.adapter)
    rows[0] = make_row(1, LOYALTY_TIER="platinum")
    new = make_row(99)
    gone = rows.pop(3)
    write_merge_fields([*rows, new])
    before = esp.total_requests()

    doc = push.preview(esp.vendor, sample=10)

    assert esp.total_requests() == before
    assert {k: doc[k] for k in ("new", "changed", "unchanged", "cleared", "quarantined")} == {
        "new": 1,
        "changed": 1,
        "unchanged": ROWS - 2,
        "cleared": 1,
        "quarantined": 0,
    }
    by_id = {d["contact_id"]: d for d in doc["sample"]}
    assert by_id["0001"]["fields"] == {"LOYALTY_TIER": [TIERS[1 % len(TIERS)], "platinum"]}
    assert by_id[gone["contact_id"]]["kind"] == "cleared"
    text = push.format_preview(doc)
    for r in [*rows, new, gone]:
        assert r["EMAIL"] not in text
    assert "c***@example.com" in text
    # Nothing moved: the real push sends exactly what the preview announced.
    result = push.push(esp.adapter)
    assert (result.new, result.changed, result.cleared) == (1, 1, 1)


def test_preview_command_prints_the_counts(rows, sandbox, sendgrid, tmp_path):
    push.push(sendgrid)
    rows[0] = make_row(1, FIRST_NAME="Renamed")
    write_merge_fields(rows)
    env = os.environ | {"PYTHONPATH": str(REPO / "plugins")}
    proc = subprocess.run(
        [sys.executable, "-m", "presend", "preview", "--vendor", "sendgrid", "--sample", "3"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "would send 1 contacts" in proc.stdout
    assert re.search(r"changed\s+1", proc.stdout)
    assert re.search(rf"unchanged\s+{ROWS - 1}", proc.stdout)
    assert "contact 0001 (changed)" in proc.stdout
    assert rows[0]["EMAIL"] not in proc.stdout
    assert "R***" in proc.stdout  # a first name is personal data: masked
    assert ledger()[rows[0]["contact_id"]] != rows[0]["fields_hash"]


def test_a_ledger_from_before_field_values_were_kept_is_upgraded_in_place(rows, sandbox, sendgrid):
    # The skeleton's ledger: hashes only, no email or field values.
    with warehouse.connect() as con:
        con.execute(
            "create table push_ledger (esp varchar not null, contact_id varchar not null, "
            "fields_hash varchar not null, acknowledged_at timestamp not null, "
            "primary key (esp, contact_id))"
        )
        con.executemany(
            "insert into push_ledger values ('sendgrid', ?, ?, now()::timestamp)",
            [[r["contact_id"], r["fields_hash"]] for r in rows[:-1]],
        )
    rows[0] = make_row(1, FIRST_NAME="Renamed")
    write_merge_fields([*rows[:-2], rows[-1]])  # and one contact gone

    result = push.push(sendgrid)

    # Unchanged contacts stay unsent; a changed one goes in full (its old values are unknown);
    # the one that left cannot be cleared without its email, and nothing fails.
    assert (result.changed, result.new, result.cleared, result.pushed) == (1, 1, 0, 2)
    assert held(sandbox.esp_url)[rows[0]["EMAIL"]]["first_name"] == "Renamed"
    assert push.push(sendgrid).pushed == 0


def test_a_changed_email_moves_the_fields_and_clears_them_under_the_old_email(rows, esp):
    push.push(esp.adapter)
    old = rows[2]
    rows[2] = make_row(3, EMAIL="moved3@example.com")
    write_merge_fields(rows)

    result = push.push(esp.adapter)

    assert (result.changed, result.rejected) == (1, 0)
    holding = esp.held()
    assert holding["moved3@example.com"]["FIRST_NAME"] == old["FIRST_NAME"]
    assert holding["moved3@example.com"]["LOYALTY_TIER"] == old["LOYALTY_TIER"]
    assert not holding[old["EMAIL"]]["FIRST_NAME"]
    assert not holding[old["EMAIL"]].get("LOYALTY_TIER")
    assert vendor_ledger(esp.vendor)[old["contact_id"]] == rows[2]["fields_hash"]
    writes = esp.writes()
    assert push.push(esp.adapter).pushed == 0
    assert esp.writes() == writes


def test_an_address_another_contact_takes_over_is_not_cleared(rows, esp):
    # A duplicate CRM record of contact 3 takes its address (identity resolution gives the
    # address to the newest record), and contact 5 moves to contact 4's old address.
    push.push(esp.adapter)
    dup = make_row(1000, EMAIL=rows[2]["EMAIL"], FIRST_NAME="Twin")
    moved = make_row(5, EMAIL=rows[3]["EMAIL"])
    rows = [
        r for r in rows if r["contact_id"] not in {rows[2]["contact_id"], rows[3]["contact_id"]}
    ]
    rows = [moved if r["contact_id"] == moved["contact_id"] else r for r in rows] + [dup]
    write_merge_fields(rows)

    result = push.push(esp.adapter)

    assert result.rejected == 0
    holding = esp.held()
    # The addresses hold their new owners' values, never a clear.
    assert holding[dup["EMAIL"]]["FIRST_NAME"] == "Twin"
    assert holding[moved["EMAIL"]]["FIRST_NAME"] == moved["FIRST_NAME"]
    assert holding[moved["EMAIL"]]["LOYALTY_TIER"] == moved["LOYALTY_TIER"]
    # Contact 5's own old address is nobody's now: cleared.
    assert not holding[make_row(5)["EMAIL"]]["FIRST_NAME"]
