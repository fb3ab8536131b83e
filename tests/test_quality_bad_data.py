"""Bad data through the whole pre-send sync (Airflow `dags test`, sandbox APIs, real dbt, GX
and push): each kind is caught at its level and the sandbox ESP receives nothing it should not.

The bad records are written into the sandbox sources themselves (`POST /_sandbox/inject` on
the CRM and the shop), so every stage, from the incremental extract on, runs for real. Three
syncs share one setup: a clean one, one with bad contacts and a sold-out product (quarantine),
one with a 60% drop in rows (block).
"""

from __future__ import annotations

import json

import duckdb
import requests
import test_end_to_end as e2e

from presend import settings

airflow_run = e2e.airflow_run  # the fixture: one presend_sync run through Airflow

LONG_EMAIL_REASON = "EMAIL length outside 3..254"
LONG_NAME_REASON = "FIRST_NAME longer than the ESP's 50 characters (or empty)"


def _warehouse(sql: str, *args) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute(sql, list(args)).fetchall()


def _inject(url: str, body: dict) -> list:
    response = requests.post(f"{url}/_sandbox/inject", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["written"]


def _last_gate() -> tuple:
    return _warehouse("select run_id, outcome from quality_runs order by checked_at desc limit 1")[
        0
    ]


def test_bad_source_data_is_quarantined_or_blocked_and_never_reaches_the_esp(airflow_run, sandbox):
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    before = e2e.esp_contacts(sandbox)
    pushed = _warehouse('select contact_id, "EMAIL" from esp_merge_fields order by contact_id')
    assert len(before) == len(pushed) > 100
    email_of = dict(pushed)
    invalid, long_email, long_name, duplicated = (c for c, _ in pushed[:4])
    handle, recommended_to = _warehouse(
        "select regexp_extract(\"REC_1_URL\", '/products/([^/?#]+)', 1) as h, count(*) "
        "from esp_merge_fields group by h order by 2 desc, 1 limit 1"
    )[0]
    assert recommended_to > 1

    # 1. In the CRM: a malformed email, a well-formed email too long for any ESP (RFC 5321:
    #    254), a first name too long for SendGrid, and a duplicate contact (a second record of
    #    a contact, its email typed in upper case with spaces). In the shop: the product
    #    recommended to most contacts sells out.
    too_long = "x" * 250 + "@example.com"
    dup_email = f"  {email_of[duplicated].upper()} "
    written = _inject(
        sandbox.crm_url,
        {
            "contacts": [
                {"id": invalid, "properties": {"email": "not-an-email"}},
                {"id": long_email, "properties": {"email": too_long}},
                {"id": long_name, "properties": {"firstname": "N" * 60}},
                {"copy_of": duplicated, "properties": {"email": dup_email}},
            ]
        },
    )
    duplicate = written[-1]
    _inject(sandbox.shop_url, {"products": [{"handle": handle, "inventory_quantity": 0}]})
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    run_id, outcome = _last_gate()
    assert outcome == "quarantined"
    # GX quarantines the contacts dbt cannot fix, with the reason, and only them.
    assert sorted(
        _warehouse("select contact_id, reasons from quality_quarantine where run_id = ?", run_id)
    ) == sorted([(long_email, LONG_EMAIL_REASON), (long_name, LONG_NAME_REASON)])
    after = e2e.esp_contacts(sandbox)
    # Quarantined: the ESP keeps their previous values and never sees the bad ones.
    assert after[email_of[long_email]] == before[email_of[long_email]]
    assert after[email_of[long_name]] == before[email_of[long_name]]
    assert too_long not in after and not any("N" * 51 in json.dumps(c) for c in after.values())
    # The malformed address never leaves the warehouse: the contract keeps valid emails only,
    # so dbt drops the contact from esp_merge_fields, and the push clears the personalization
    # it left under its old address, as for any contact that may no longer be emailed.
    assert not any("not-an-email" in json.dumps(c) for c in after.values())
    assert after[email_of[invalid]]["first_name"] == ""
    assert set(after[email_of[invalid]]["custom_fields"].values()) == {""}
    assert _warehouse("select count(*) from esp_merge_fields where contact_id = ?", invalid) == [
        (0,)
    ]
    # The duplicate: identity resolution gives the address to the newest record, so the mart
    # keeps one row per address, dbt's build passes, and the ESP holds that address once, with
    # the same person's values (recommendations may move with the sold-out product), never a
    # clear of the record that lost the address.
    assert _warehouse(
        'select contact_id from esp_merge_fields where "EMAIL" = ?', email_of[duplicated]
    ) == [(duplicate,)]
    assert _warehouse('select count(*) = count(distinct "EMAIL") from esp_merge_fields') == [
        (True,)
    ]
    held, held_before = after[email_of[duplicated]], before[email_of[duplicated]]
    assert held["first_name"] == held_before["first_name"]
    for field in ("LOYALTY_TIER", "ORDER_COUNT", "LIFETIME_VALUE"):
        assert held["custom_fields"][field] == held_before["custom_fields"][field]
    assert (
        held["custom_fields"]["REC_1_URL"]
        == _warehouse('select "REC_1_URL" from esp_merge_fields where contact_id = ?', duplicate)[
            0
        ][0]
    )
    assert set(after) == set(before)
    # The sold-out product is recommended to nobody; only the quarantined contacts, not pushed
    # this run, may still hold it at the ESP.
    assert _warehouse(
        "select count(*) from esp_merge_fields where concat_ws('|', \"REC_1_URL\", "
        '"REC_2_URL", "REC_3_URL") like ?',
        f"%/products/{handle}%",
    ) == [(0,)]
    held_url = {e for e, c in after.items() if f"/products/{handle}" in json.dumps(c)}
    assert held_url <= {email_of[c] for c in (long_email, long_name)}

    # 2. 60% of the contacts withdraw consent at once: a volume anomaly blocks the whole push.
    puts = e2e.put_requests(sandbox)
    marketable = [r[0] for r in _warehouse("select contact_id from esp_merge_fields order by 1")]
    dropped = [c for i, c in enumerate(marketable) if i % 10 < 6]
    _inject(
        sandbox.crm_url,
        {"contacts": [{"id": c, "properties": {"hs_marketable_status": "false"}} for c in dropped]},
    )
    code, log = airflow_run(sandbox)
    assert code != 0
    assert "quality gate blocked the push" in log
    assert "expect_table_row_count_to_be_between(esp_merge_fields): observed" in log
    assert "Data Docs: " in log
    assert _last_gate()[1] == "blocked"
    assert _warehouse(
        "select status, failed_stage from sync_runs order by recorded_at desc limit 1"
    ) == [("failed", "quality")]
    assert e2e.put_requests(sandbox) == puts and e2e.esp_contacts(sandbox) == after
    assert airflow_run.guard_log.read_text() == ""
