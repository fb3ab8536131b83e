"""Incremental runs pick up what the load stage merged since the last run, and give exactly the
esp_merge_fields a `--full-refresh` gives; the snapshot keeps the profile's history."""

from __future__ import annotations

import json
from decimal import Decimal

import duckdb
import pytest
from test_dbt_fixture import AS_OF, EXPECTED, STORE, load_duckdb_fixture, merge_fields_duckdb

from presend import settings, transform, warehouse

LATER = "2026-11-20 11:30:00"  # _loaded_at of the second load
VARS = {"as_of": AS_OF, "store_url": STORE}


def _second_load() -> None:
    """What a later load merges: changed orders (same ids) and new events."""
    with warehouse.connect() as con:
        # Grace's order is cancelled: it no longer counts, and her Road Shoe is back in the cart.
        order = json.loads(
            con.execute("select record from raw.shop_orders where id = '1004'").fetchone()[0]
        )
        order["cancelled_at"] = "2026-11-19T10:00:00Z"
        con.execute(
            "update raw.shop_orders set record = ?, _loaded_at = ? where id = '1004'",
            [json.dumps(order), LATER],
        )
        # The stranger's order loses its Trail Shoe line: that line must disappear.
        order = json.loads(
            con.execute("select record from raw.shop_orders where id = '1006'").fetchone()[0]
        )
        order["line_items"] = [li for li in order["line_items"] if li["product_id"] != 101]
        con.execute(
            "update raw.shop_orders set record = ?, _loaded_at = ? where id = '1006'",
            [json.dumps(order), LATER],
        )
        # Linus opens an email at 06:00 UTC (no time zone known: UTC).
        event = {"id": "e99", "type": "email_opened", "email": " LINUS@example.com"}
        con.execute(
            "insert into raw.events (id, occurred_at, record, _landing_file, _loaded_at) "
            "values ('e99', '2026-11-19 06:00:00', ?, 'fixture-2', ?)",
            [json.dumps(event), LATER],
        )


@pytest.fixture
def two_loads(data_dir):
    load_duckdb_fixture()
    transform.build(extra_vars=VARS)
    assert merge_fields_duckdb() == EXPECTED
    _second_load()
    transform.build(extra_vars=VARS)
    return merge_fields_duckdb()


def test_an_incremental_run_picks_up_changed_orders_and_new_events(two_loads):
    grace, linus = two_loads["2"], two_loads["3"]
    assert grace[3:6] == (0, Decimal("0.00"), "")  # ORDER_COUNT, LIFETIME_VALUE, LAST_ORDER_DATE
    assert grace[-3:] == ("Fleece", 2, 9)  # the Road Shoe is back in her cart
    assert linus[-1] == 6  # BEST_SEND_HOUR
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        lines = con.sql(
            "select product_id from stg_shop__order_lines where order_id = '1006'"
        ).fetchall()
    assert lines == [("103",)]


def test_a_full_refresh_gives_the_same_merge_fields_as_the_incremental_path(two_loads):
    transform.build("--full-refresh", extra_vars=VARS)
    assert merge_fields_duckdb() == two_loads
    assert two_loads != EXPECTED  # the comparison is about changed data


def test_the_snapshot_keeps_the_last_known_values_of_a_changed_profile(two_loads):
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        versions = con.sql(
            "select order_count, lifetime_value, dbt_valid_to is null "
            "from snapshots.customer_profile_snapshot where contact_id = '2' "
            "order by dbt_valid_from"
        ).fetchall()
        unchanged = con.execute(
            "select count(*) from snapshots.customer_profile_snapshot where contact_id = '1'"
        ).fetchone()[0]
    assert versions == [(1, Decimal("89.00"), False), (0, Decimal("0.00"), True)]
    assert unchanged == 1
