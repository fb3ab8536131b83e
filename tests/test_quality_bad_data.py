"""Bad data through the whole pre-send sync (Airflow `dags test`, sandbox APIs, real dbt, GX
and push): each kind is caught at its level and the sandbox ESP receives nothing it should not.

The sandbox APIs serve clean synthetic data, so after a clean first sync the bad records are
written into the raw tables the way the load stage writes what a source sent (newer version,
fresh `_loaded_at`); every later stage then runs for real.
"""

from __future__ import annotations

import json

import duckdb
import test_end_to_end as e2e

from presend import settings

airflow_run = e2e.airflow_run  # the fixture: one presend_sync run through Airflow


def _raw(sql: str, *args) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path())) as con:
        return con.execute(sql, list(args)).fetchall()


def _patch_contacts(ids: list[str], patch: dict) -> None:
    """New versions of CRM contacts, as if the CRM sent them and the load merged them."""
    _raw(
        "update raw.crm_contacts set properties = json_merge_patch(properties, ?), "
        "lastmodifieddate = lastmodifieddate + interval 1 second, _loaded_at = now()::timestamp "
        "where id in (select unnest(?::varchar[]))",
        json.dumps(patch),
        ids,
    )


def _sold_out(handle: str) -> None:
    """The product goes out of stock at the shop: every variant's inventory drops to 0."""
    [(pid, record)] = _raw(
        "select id, record from raw.shop_products where record ->> 'handle' = ?", handle
    )
    record = json.loads(record)
    for variant in record["variants"]:
        variant["inventory_quantity"] = 0
    _raw(
        "update raw.shop_products set record = ?, updated_at = updated_at + interval 1 second, "
        "_loaded_at = now()::timestamp where id = ?",
        json.dumps(record),
        pid,
    )


def _last_sync() -> tuple:
    return _raw("select status, failed_stage from sync_runs order by recorded_at desc limit 1")[0]


def _last_gate() -> tuple:
    return _raw("select run_id, outcome from quality_runs order by checked_at desc limit 1")[0]


def test_bad_source_data_is_quarantined_or_blocked_and_never_reaches_the_esp(airflow_run, sandbox):
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    before = e2e.esp_contacts(sandbox)
    pushed = _raw('select contact_id, "EMAIL", "FIRST_NAME" from esp_merge_fields')
    assert len(before) == len(pushed) > 100
    # Contacts far from the CRM cursor, so the next extract does not bring their old version.
    oldest = [
        r[0]
        for r in _raw(
            "select id from raw.crm_contacts where id in (select contact_id from "
            "esp_merge_fields) order by lastmodifieddate, id limit 2"
        )
    ]
    emails = dict((c, e) for c, e, _ in pushed)
    names = dict((e, n) for _, e, n in pushed)
    invalid, too_long = oldest
    handle, recommended_to = _raw(
        "select regexp_extract(\"REC_1_URL\", '/products/([^/?#]+)', 1) as h, count(*) "
        "from esp_merge_fields group by h order by 2 desc, 1 limit 1"
    )[0]
    assert recommended_to > 1

    # 1. An invalid email and a first name too long for SendGrid; a recommended product
    #    sells out. The invalid address never leaves the warehouse (dbt keeps only valid
    #    emails); the long name is quarantined by GX, the ESP keeping that contact's old
    #    values; the sold-out product is recommended to nobody; everyone else is pushed.
    _patch_contacts([invalid], {"email": "not-an-email"})
    _patch_contacts([too_long], {"firstname": "N" * 60})
    _sold_out(handle)
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    run_id, outcome = _last_gate()
    assert outcome == "quarantined"
    assert _raw("select contact_id, reasons, run_id from quarantined_contacts") == [
        (too_long, "FIRST_NAME longer than the ESP's 50 characters (or empty)", run_id)
    ]
    after = e2e.esp_contacts(sandbox)
    assert "not-an-email" not in after
    assert after[emails[too_long]]["first_name"] == names[emails[too_long]]
    assert not any("N" * 51 in json.dumps(c) for c in after.values())
    # The ESP names custom fields by id; any value holding the sold-out product's page counts.
    held_url = [e for e, c in after.items() if f"/products/{handle}" in json.dumps(c)]
    assert set(held_url) <= {emails[too_long], emails[invalid]}
    assert _raw(
        "select count(*) from esp_merge_fields where concat_ws('|', \"REC_1_URL\", "
        '"REC_2_URL", "REC_3_URL") like ?',
        f"%/products/{handle}%",
    ) == [(0,)]

    # 2. 60% of the contacts withdraw consent at once: a volume anomaly blocks the whole push.
    puts = e2e.put_requests(sandbox)
    held = e2e.esp_contacts(sandbox)
    marketable = [r[0] for r in _raw("select contact_id from esp_merge_fields order by 1")]
    dropped = [c for i, c in enumerate(marketable) if i % 10 < 6]
    _patch_contacts(dropped, {"hs_marketable_status": "false"})
    code, log = airflow_run(sandbox)
    assert code != 0
    assert "expect_table_row_count_to_be_between(esp_merge_fields): observed" in log
    assert _last_gate()[1] == "blocked"
    assert _last_sync() == ("failed", "quality")
    assert e2e.put_requests(sandbox) == puts and e2e.esp_contacts(sandbox) == held

    # 3. Consent is back and a duplicate contact appears (a second CRM record with the same
    #    email). dbt resolves identities by email, so the mart keeps one row per address (GX
    #    would quarantine a duplicate that got through: tests/test_quality.py); the ESP gets
    #    nothing new: the restored contacts still hold their values there.
    _patch_contacts(dropped, {"hs_marketable_status": "true"})
    original = marketable[-1]
    _raw(
        "insert into raw.crm_contacts select 'dup-' || id, lastmodifieddate, archived, "
        "properties, _landing_file, now()::timestamp from raw.crm_contacts where id = ?",
        original,
    )
    code, log = airflow_run(sandbox)
    assert code == 0, log[-5000:]
    assert _raw("select count(*) from esp_merge_fields where contact_id like 'dup-%'") == [(0,)]
    assert _raw('select count(*), count(distinct "EMAIL") from esp_merge_fields') == [
        (len(marketable), len(marketable))
    ]
    assert e2e.put_requests(sandbox) == puts and e2e.esp_contacts(sandbox) == held
    assert airflow_run.guard_log.read_text() == ""
