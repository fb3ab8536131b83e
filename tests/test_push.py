"""The push stage: changed merge fields to the ESP in batches, with a ledger and rejects."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import requests

from presend import push, warehouse
from presend.esp import Change
from presend.esp.sendgrid import SendGrid
from presend.sandbox.crm import FIRST_NAMES, TIERS
from presend.sandbox.esp import FIELD_MAX_LENGTH
from presend.sandbox.server import ESP_API_KEY

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
