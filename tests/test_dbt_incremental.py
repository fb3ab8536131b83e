"""Incremental runs pick up what the load stage merged since the last run, and give exactly the
esp_merge_fields a `--full-refresh` gives; the snapshot keeps the profile's history."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
import yaml
from test_dbt_fixture import (
    AS_OF,
    EXPECTED,
    STORE,
    _rec,
    load_duckdb_fixture,
    merge_fields_duckdb,
)

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


def _order_lines_slice() -> int:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute("select count(*) from int_identity__contact_order_lines").fetchone()[0]


def test_an_incremental_run_after_a_full_refresh_gives_the_full_refresh_merge_fields(data_dir):
    """A full refresh leaves the order-lines slice empty (its per-contact models read the
    orders-lines join themselves); the next incremental run fills it with the lines of the
    contacts it recomputes and gives what a full refresh of the same data gives."""
    load_duckdb_fixture()
    transform.build("--full-refresh", extra_vars=VARS)
    assert merge_fields_duckdb() == EXPECTED
    assert _order_lines_slice() == 0
    _second_load()
    transform.build(extra_vars=VARS)
    incremental = merge_fields_duckdb()
    assert _order_lines_slice() > 0
    assert incremental != EXPECTED
    transform.build("--full-refresh", extra_vars=VARS)
    assert merge_fields_duckdb() == incremental


def test_the_snapshot_keeps_the_last_known_values_of_a_changed_profile(two_loads):
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        versions = con.sql(
            "select order_count, lifetime_value, dbt_valid_to is null "
            "from snapshots.customer_profile_snapshot where contact_id = '2' "
            "order by dbt_valid_from"
        ).fetchall()
        unchanged = con.execute(
            "select count(*), count(dbt_valid_to) from snapshots.customer_profile_snapshot "
            "where contact_id = '1'"
        ).fetchone()
    assert versions == [(1, Decimal("89.00"), False), (0, Decimal("0.00"), True)]
    assert unchanged == (1, 0)  # one version, still current


def _snapshot_versions() -> dict[str, list[bool]]:
    """Per contact: whether each version (oldest first) is still current."""
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        rows = con.sql(
            "select contact_id, dbt_valid_to is null from snapshots.customer_profile_snapshot "
            "order by contact_id, dbt_valid_from"
        ).fetchall()
    versions: dict[str, list[bool]] = {}
    for contact_id, current in rows:
        versions.setdefault(contact_id, []).append(current)
    return versions


def test_the_snapshot_closes_an_archived_contact_and_catches_up_after_runs_without_it(
    two_loads,
):
    """The snapshot compares only contacts recomputed since it last ran: a contact archived
    in the CRM is still closed, and changes made by runs that left the snapshot out (`dbt
    run`) reach it at the next build."""
    before = _snapshot_versions()
    assert before["1"] == [True] and before["4"] == [True]
    # Ada is archived in the CRM, then a `dbt run` (no snapshot) recomputes her away.
    with warehouse.connect() as con:
        con.execute(
            "update raw.crm_contacts set archived = true, _loaded_at = now()::timestamp "
            "where id = '1'"
        )
    _run_models()
    # Tia's loyalty tier changes; this build runs the snapshot.
    _update_raw("crm_contacts", "4", lambda p: p.update(loyalty_tier="gold"))
    transform.build(extra_vars=VARS)
    after = _snapshot_versions()
    assert after["1"] == [False]  # closed: she left customer_profile
    assert after["4"] == [False, True]  # a new version for the new tier
    assert {c: v for c, v in after.items() if c not in ("1", "4")} == {
        c: v for c, v in before.items() if c not in ("1", "4")
    }
    with warehouse.connect() as con:
        left = con.execute("select count(*) from int_affected_contacts__unsnapshotted").fetchone()
    assert left == (0,)


def _run_models(as_of: str = AS_OF) -> dict[str, tuple]:
    """An incremental `dbt run` of esp_merge_fields and its parents (no tests: faster)."""
    proc = transform.run_dbt(
        "run", "--select", "+esp_merge_fields", extra_vars={"as_of": as_of, "store_url": STORE}
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    return merge_fields_duckdb()


def _update_raw(table: str, key: str, change) -> None:
    """Change one raw record as a later load would (new `_loaded_at`)."""
    column = "properties" if table == "crm_contacts" else "record"
    with warehouse.connect() as con:
        record = json.loads(
            con.execute(f"select {column} from raw.{table} where id = ?", [key]).fetchone()[0]
        )
        change(record)
        con.execute(
            f"update raw.{table} set {column} = ?, _loaded_at = now()::timestamp "
            + (", lastmodifieddate = now()::timestamp " if table == "crm_contacts" else "")
            + "where id = ?",
            [json.dumps(record), key],
        )


def test_each_kind_of_change_reaches_exactly_the_contacts_it_affects(data_dir):
    """One change per incremental run, each reaching contacts no other rule would: a wrong
    affected set leaves a stale row here. A full refresh at the end gives the same rows."""
    load_duckdb_fixture()
    transform.build(extra_vars=VARS)
    expected = dict(EXPECTED)

    # Ada withdraws her marketing consent: she leaves esp_merge_fields, nobody else changes.
    _update_raw("crm_contacts", "1", lambda p: p.update(hs_marketable_status="false"))
    del expected["1"]
    assert _run_models() == expected

    # Nope gives consent under Tia's email, modified later: Nope now owns the email (and
    # Tia's order and events), Tia no longer does. Nope's own open was under his old email.
    _update_raw(
        "crm_contacts",
        "5",
        lambda p: p.update(hs_marketable_status="true", email="tia@example.com"),
    )
    tia = expected.pop("4")
    expected["5"] = (tia[0], "Nope", "gold", *tia[3:])
    assert _run_models() == expected

    # Linus orders a Fleece now: his order facts, favourite category (Jackets) and
    # recommendations change; the Fleece overtakes the Road Shoe at rank 4 of the best
    # sellers, which only lists reading 4 ranks (Grace's, who bought one product) use.
    with warehouse.connect() as con:
        order = json.loads(
            con.execute("select record from raw.shop_orders where id = '1005'").fetchone()[0]
        )
        order |= {"id": 1008, "email": "linus@example.com", "refunds": []}
        order |= {"created_at": "2026-11-20T10:00:00Z", "financial_status": "paid"}
        order["line_items"][0]["id"] = 10080
        con.execute(
            "insert into raw.shop_orders values ('1008', '2026-11-20 10:00:00', ?, 'fixture-2', "
            "now()::timestamp)",
            [json.dumps(order)],
        )
    linus = expected["3"]
    expected["3"] = (
        *linus[:3],
        1,
        Decimal("65.00"),
        "2026-11-20",
        "Jackets",
        *_rec(103),
        *_rec(101),
        *_rec(104),
        *linus[-3:],
    )
    assert _run_models() == expected

    # Two days later, with no new data: Grace's Fleece left the 72-hour cart window.
    later = "2026-11-22 12:00:00"
    grace = expected["2"]
    expected["2"] = (*grace[:-3], "", 0, grace[-1])
    assert _run_models(later) == expected

    # The Rain Jacket sells out: it leaves every list of recommendations.
    _update_raw("shop_products", "103", lambda r: r["variants"][0].update(inventory_quantity=0))
    incremental = _run_models(later)
    assert all("Rain Jacket" not in fields for fields in incremental.values())
    # Linus: no Jacket left that he has not bought; the best sellers in stock instead.
    assert incremental["3"][7:16] == (*_rec(101), *_rec(104), *_rec(102))

    transform.build("--full-refresh", extra_vars={"as_of": later, "store_url": STORE})
    assert merge_fields_duckdb() == incremental


def test_a_best_seller_change_below_the_top_3_reaches_contacts_who_bought_a_top_3_product(
    data_dir,
):
    """A contact who bought n products in 90 days reads 3 + n ranks of a best-seller list:
    a change at rank 4 alone reaches Linus, who bought the #1, and nobody else's data moved."""
    load_duckdb_fixture()
    transform.build(extra_vars=VARS)
    with warehouse.connect() as con:
        # The first run's snapshot compared every contact: none is left for the next.
        assert con.execute(
            "select count(*) from int_affected_contacts__unsnapshotted"
        ).fetchone() == (0,)
        order = json.loads(
            con.execute("select record from raw.shop_orders where id = '1007'").fetchone()[0]
        )
        order |= {"id": 1009, "email": "linus@example.com", "created_at": "2026-11-20T10:00:00Z"}
        order["line_items"][0]["id"] = 10090
        con.execute(
            "insert into raw.shop_orders values ('1009', '2026-11-20 10:00:00', ?, 'fixture-2', "
            "now()::timestamp)",
            [json.dumps(order)],
        )
    # The Wool Hat is now the best seller (his favourite category, Accessories, has nothing
    # else in stock): Linus gets the best sellers he has not bought, ranks 2 to 4.
    assert _run_models()["3"][7:16] == (*_rec(101), *_rec(103), *_rec(102))
    # The Road Shoe (rank 4) sells out: the Fleece moves up to rank 4.
    _update_raw(
        "shop_products",
        "102",
        lambda r: [variant.update(inventory_quantity=0) for variant in r["variants"]],
    )
    incremental = _run_models()
    assert incremental["3"][7:16] == (*_rec(101), *_rec(103), *_rec(107))
    transform.build("--full-refresh", extra_vars=VARS)
    assert merge_fields_duckdb() == incremental


def test_a_change_in_the_top_3_of_a_best_seller_list_reaches_a_contact_without_orders(
    data_dir,
):
    """Every contact reads the top 3 of the store's best sellers and of its favourite
    category's: Linus, who has no orders (so reads no deeper), gets a change in either."""
    load_duckdb_fixture()
    transform.build(extra_vars=VARS)

    def sell_out(product_id: str) -> None:
        _update_raw(
            "shop_products",
            product_id,
            lambda r: [variant.update(inventory_quantity=0) for variant in r["variants"]],
        )

    # The Road Shoe sells out: #2 of Shoes (his favourite), only #4 of the store.
    sell_out("102")
    assert _run_models()["3"][7:16] == (*_rec(101), *_rec(103), *_rec(104))
    # The Rain Jacket sells out: #2 of the store, not in his favourite category.
    sell_out("103")
    incremental = _run_models()
    assert incremental["3"][7:16] == (*_rec(101), *_rec(104), *_rec(107))
    transform.build("--full-refresh", extra_vars=VARS)
    assert merge_fields_duckdb() == incremental


def test_a_changed_merge_field_default_reaches_every_contact_without_a_full_refresh(two_loads):
    transform.build(
        extra_vars=VARS
        | {
            "merge_field_defaults": {
                "FIRST_NAME": "friend",
                "LOYALTY_TIER": "member",
                "BEST_SEND_HOUR": "10",
            }
        }
    )
    assert merge_fields_duckdb()["3"][1:3] == ("friend", "member")


def _build_then_write(sql: str, *params: object) -> None:
    """Build the fixture, then change the warehouse behind dbt's back (a loader bug, a bad
    row) with `sql`."""
    load_duckdb_fixture()
    transform.build(extra_vars=VARS)
    with warehouse.connect() as con:
        con.execute(sql, list(params))


def _tests_after_write(model: str, sql: str) -> subprocess.CompletedProcess:
    """Build the fixture, change the warehouse behind dbt's back with `sql`, then run the data
    tests of `model`."""
    _build_then_write(sql)
    return transform.run_dbt("test", "--select", model, extra_vars=VARS)


def test_an_incremental_run_tests_new_rows_against_the_whole_table(data_dir):
    """Data tests of big tables check only the rows loaded since the last transform, but a
    new row whose key an older row already holds still fails the uniqueness test."""
    # A later load writes an order again (a loader bug): the old row is not rewritten.
    _build_then_write(
        "insert into raw.shop_orders select * replace "
        "('fixture-2' as _landing_file, ?::timestamp as _loaded_at) "
        "from raw.shop_orders where id = (select min(id) from raw.shop_orders)",
        LATER,
    )
    with pytest.raises(transform.DbtBuildError, match="source_primary_key_shop_shop_orders_id"):
        transform.build(extra_vars=VARS)


def test_an_event_loaded_twice_in_one_load_fails_its_test(data_dir):
    """raw.events' key test reads only the events loaded since the last transform (all 10M
    ids would cost every run a third of a second at 1M contacts): two copies of one new event
    fail it."""
    new_event = (
        "select 'e-twice', occurred_at, record, 'fixture-2', ?::timestamp "
        "from raw.events where id = (select min(id) from raw.events)"
    )
    _build_then_write(f"insert into raw.events {new_event} union all {new_event}", LATER, LATER)
    with pytest.raises(transform.DbtBuildError, match="source_primary_key_analytics_events_id"):
        transform.build(extra_vars=VARS)


def test_a_null_primary_key_fails_its_test(data_dir):
    """primary_key (one test for not_null and unique) fails on a row without a key."""
    proc = _tests_after_write(
        "int_product_sales",
        "insert into int_product_sales (product_id, title) values (null, 'no key')",
    )
    assert proc.returncode == 1
    assert "FAIL 1 primary_key_int_product_sales_product_id" in proc.stdout


def test_a_copy_of_a_snapshot_version_fails_the_version_id_test(data_dir):
    """The snapshot's dbt_scd_id test reads the versions the last run wrote (1M versions would
    cost every run a third of a second): a second copy of one of them fails it."""
    proc = _tests_after_write(
        "customer_profile_snapshot",
        "insert into snapshots.customer_profile_snapshot "
        "select * from snapshots.customer_profile_snapshot limit 1",
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "FAIL 1 unique_customer_profile_snapshot_dbt_scd_id" in proc.stdout


def test_a_second_contact_with_an_email_the_run_wrote_warns(data_dir):
    """esp_merge_fields' tests read the contacts its last build rewrote (the consumed
    int_affected_contacts), not all 1M rows each run; a row of another contact that shares
    the email of one of them still trips the email's uniqueness test (a warning: the quality
    gate quarantines such contacts)."""
    proc = _tests_after_write(
        "esp_merge_fields",
        "insert into esp_merge_fields select * replace ('someone-else' as contact_id) "
        "from esp_merge_fields where contact_id = (select min(contact_id) from esp_merge_fields)",
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "WARN 1 unique_esp_merge_fields__EMAIL_" in proc.stdout
    assert "PASS unique_esp_merge_fields_contact_id" in proc.stdout


def test_the_builds_between_two_that_compact_leave_compaction_to_the_next_due(
    data_dir, monkeypatch, tmp_path
):
    """The pipeline's builds let DuckDB compact the tables they rewrite only once every
    transform.compact_every_hours (a day by default), and on a full refresh."""
    load_duckdb_fixture()
    assert transform.build(extra_vars=VARS).compacted  # no build has compacted this warehouse
    _second_load()
    assert not transform.build(extra_vars=VARS).compacted  # the last one is minutes old
    assert transform.build("--full-refresh", extra_vars=VARS).compacted
    assert not transform.compaction_due()
    a_day_ago = datetime.now(UTC) - timedelta(hours=24, minutes=1)
    assert transform.compaction_due(now=datetime.now(UTC) + timedelta(hours=24, minutes=1))
    Path(f"{settings.warehouse_path()}.compacted_at").write_text(a_day_ago.isoformat())
    assert transform.build(extra_vars=VARS).compacted
    assert not transform.build(extra_vars=VARS).compacted
    # compact_every_hours: 0 compacts on every build.
    doc = yaml.safe_load(settings.CONFIG_FILE.read_text())
    doc["transform"]["compact_every_hours"] = 0
    (tmp_path / "presend.yml").write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(settings, "CONFIG_FILE", tmp_path / "presend.yml")
    assert transform.build(extra_vars=VARS).compacted


@pytest.mark.parametrize(("tasks", "expected"), [(None, "100"), ("0", "0")])
def test_the_profile_gives_duckdb_the_compaction_setting_of_the_build(data_dir, tasks, expected):
    """What transform.build sets reaches DuckDB: 0 vacuum tasks = no compaction while it
    checkpoints; DuckDB's default (100) otherwise, as for dbt run by hand."""
    load_duckdb_fixture()
    env = {} if tasks is None else {"PRESEND_DUCKDB_MAX_VACUUM_TASKS": tasks}
    proc = transform.run_dbt(
        "show",
        "--inline",
        "select current_setting('max_vacuum_tasks') as max_vacuum_tasks",
        extra_vars=VARS,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert re.search(rf"\|\s*{expected}\s*\|", proc.stdout), proc.stdout[-2000:]
