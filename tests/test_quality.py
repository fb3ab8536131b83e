"""The Great Expectations gate from expectations/ over the warehouse: real GX, real DuckDB.

Each test writes the tables the gate reads (esp_merge_fields, raw sources, the product
catalogue) and checks what a data engineer relies on: which level catches what, who is
quarantined and why, what the failure message says, and what history is kept.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from html import unescape

import duckdb
import pytest

from presend import quality, settings, warehouse

COLUMNS = ["contact_id", "EMAIL", "FIRST_NAME", "LOYALTY_TIER", "fields_hash"]


def contacts(n: int, start: int = 1) -> list[tuple]:
    tiers = ["bronze", "silver", "gold", "platinum", "member"]
    return [
        (str(i), f"contact{i}@example.com", "Ada" if i % 2 else "there", tiers[i % 5], f"h{i}")
        for i in range(start, start + n)
    ]


def write_merge_fields(rows, columns=COLUMNS, types=None) -> None:
    types = types or {}
    cols = ", ".join(f'"{c}" {types.get(c, "varchar")}' for c in columns)
    with warehouse.connect() as con:
        con.execute(f"create or replace table esp_merge_fields ({cols})")
        if rows:
            marks = ", ".join("?" for _ in columns)
            con.executemany(f"insert into esp_merge_fields values ({marks})", rows)


def write_crm_source(loaded_hours_ago: float = 1, records: int = 100, rejected: int = 0) -> None:
    """raw.crm_contacts, load_log and rejects as the load stage writes them."""
    loaded = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=loaded_hours_ago)
    with warehouse.connect() as con:
        con.execute("create schema if not exists raw")
        con.execute(
            "create or replace table raw.crm_contacts (id varchar, _loaded_at timestamp); "
            "create or replace table raw.load_log (landing_file varchar, stream varchar, "
            "records integer, loaded_at timestamp); "
            "create or replace table raw.rejects (stream varchar, landing_file varchar, "
            "record json, reason varchar, rejected_at timestamp)"
        )
        con.execute("insert into raw.crm_contacts values ('1', ?)", [loaded])
        con.execute(
            "insert into raw.load_log values ('p1.json', 'crm_contacts', ?, ?)", [records, loaded]
        )
        for _ in range(rejected):
            con.execute(
                "insert into raw.rejects values ('crm_contacts', 'p1.json', '{}', 'bad', ?)",
                [loaded],
            )


def page_text(html: str) -> str:
    """The visible text of a Data Docs page."""
    html = re.sub(r"<(script|style).*?</\1>", "", html, flags=re.S)
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def query(sql: str, *args):
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute(sql, list(args)).fetchall()


@pytest.fixture
def fresh_source(data_dir):
    write_crm_source()
    return data_dir


def test_good_merge_fields_pass_build_data_docs_and_keep_history(fresh_source):
    write_merge_fields(contacts(100))
    result = quality.gate("run-1")
    assert result.outcome == "passed" and result.failed == 0 and result.passed >= 15
    assert result.rows == 100 and result.quarantined == 0

    index = fresh_source / "gx" / "data_docs" / "index.html"
    assert "esp_merge_fields" in index.read_text() and "source_health" in index.read_text()
    page = result.data_docs
    assert page.endswith(".html") and "run-1" in page
    with open(page) as html:
        assert "contact_id" in html.read()

    assert query("select outcome, rows, failed, quarantined from quality_runs") == [
        ("passed", 100, 0, 0)
    ]
    checked = query(
        "select suite, expectation, \"column\" from quality_results where run_id = 'run-1' "
        "and success"
    )
    assert ("esp_merge_fields", "expect_column_values_to_be_unique", "contact_id") in checked
    assert ("source_health", "expect_column_max_to_be_between", "crm_contacts__age_hours") in (
        checked
    )
    # Merge fields the models do not produce yet are recorded as not applicable, not passed.
    assert query(
        "select count(*) from quality_results "
        "where success is null and \"column\" = 'BEST_SEND_HOUR'"
    ) == [(2,)]
    assert query("select count(*) from quarantined_contacts") == [(0,)]


def test_row_level_failures_quarantine_only_the_offending_contacts(fresh_source):
    rows = contacts(100)
    rows[10] = ("5", "dup-of-five@example.com", "Ada", "gold", "hx")  # a duplicate contact
    rows[20] = ("21", "no-at-sign.example.com", "Ada", "gold", "h21")  # an invalid email
    rows[30] = ("31", "contact31@example.com", "N" * 51, "gold", "h31")  # too long for SendGrid
    rows[40] = ("41", "contact41@example.com", "Ada", "diamond", "h41")  # unknown tier
    write_merge_fields(rows)

    result = quality.gate("run-q")

    assert result.outcome == "quarantined" and result.rows == 100
    assert result.quarantined == 4
    quarantined = dict(query("select contact_id, reasons from quarantined_contacts"))
    assert quarantined == {
        "5": "duplicate contact_id",
        "21": "EMAIL is not a well-formed address",
        "31": "FIRST_NAME longer than the ESP's 50 characters (or empty)",
        "41": "LOYALTY_TIER not an allowed tier",
    }
    assert query("select distinct run_id from quarantined_contacts") == [("run-q",)]
    assert query("select count(*) from quality_quarantine where run_id = 'run-q'") == [(4,)]
    # Reasons and failure summaries carry ids and counts, never the offending values.
    stored = json.dumps(query("select * from quality_results")) + json.dumps(result.to_dict())
    assert "no-at-sign" not in stored and "dup-of-five" not in stored and "N" * 51 not in stored
    # Nor do the stored validation results and the Data Docs pages.
    for written in (fresh_source / "gx").rglob("*.*"):
        if written.suffix in (".json", ".html"):
            text = written.read_text()
            assert "no-at-sign" not in text and "dup-of-five" not in text, written


def test_quarantine_is_replaced_on_every_run_and_kept_in_history(fresh_source):
    rows = contacts(100)
    rows[0] = ("1", "broken", "Ada", "gold", "h1")
    write_merge_fields(rows)
    quality.gate("run-a")
    write_merge_fields(contacts(100))
    quality.gate("run-b")
    assert query("select count(*) from quarantined_contacts") == [(0,)]
    assert query("select run_id, contact_id from quality_quarantine") == [("run-a", "1")]


def test_too_many_quarantined_contacts_block_the_push(fresh_source):
    rows = contacts(100)
    for i in range(10):  # 10% > quality.max_failed_share (5%)
        rows[i] = (rows[i][0], f"broken-{i}", *rows[i][2:])
    write_merge_fields(rows)
    with pytest.raises(quality.QualityGateError) as err:
        quality.gate("run-many")
    message = str(err.value)
    assert "quarantined share: observed 10 of 100 contacts (10.0%)" in message
    assert "expect_column_values_to_match_regex(EMAIL): observed 10 unexpected rows" in message
    assert "broken-" not in message
    assert query("select outcome from quality_runs") == [("blocked",)]


def test_a_sixty_percent_drop_in_rows_blocks_the_push_and_links_the_data_docs(fresh_source):
    write_merge_fields(contacts(100))
    assert quality.gate("run-full").outcome == "passed"
    write_merge_fields(contacts(40))
    with pytest.raises(quality.QualityGateError) as err:
        quality.gate("run-drop")
    message = str(err.value)
    assert "expect_table_row_count_to_be_between(esp_merge_fields): observed 40" in message
    assert "volume anomaly" in message
    docs = message.split("Data Docs: ")[1].split(" ")[0]
    assert docs.endswith(".html") and "run-drop" in docs
    with open(docs) as page:
        assert "Must have greater than or equal to 50 and less than or equal to 300 rows" in (
            page_text(page.read())
        )
    assert query("select outcome from quality_runs order by checked_at") == [
        ("passed",),
        ("blocked",),
    ]
    # The band is measured against the last run that pushed, not the blocked one.
    write_merge_fields(contacts(45))
    with pytest.raises(quality.QualityGateError, match="observed 45"):
        quality.gate("run-drop-again")


def test_stale_source_data_blocks_the_push(data_dir):
    write_crm_source(loaded_hours_ago=48)
    write_merge_fields(contacts(100))
    with pytest.raises(quality.QualityGateError) as err:
        quality.gate("run-stale")
    message = str(err.value)
    assert "expect_column_max_to_be_between(newest_source_age_hours): observed 48" in message
    assert "expect_column_max_to_be_between(crm_contacts__age_hours): observed 48" in message


def test_a_high_share_of_rejected_source_records_blocks_the_push(data_dir):
    write_crm_source(records=100, rejected=10)
    write_merge_fields(contacts(100))
    with pytest.raises(
        quality.QualityGateError, match=r"crm_contacts__rejected_share\): observed 0.1"
    ):
        quality.gate("run-rejects")


def test_recommended_products_must_exist_and_be_in_stock(fresh_source):
    columns = [*COLUMNS, "REC_1_TITLE", "REC_1_URL", "REC_1_PRICE"]
    url = "https://shop.example.com/products/{}"
    rows = [(*r, "Boots", url.format("boots"), "10.00") for r in contacts(100)]
    rows[0] = (*rows[0][:5], "Hat", url.format("hat"), "5.00")  # out of stock
    rows[1] = (*rows[1][:5], "Gone", url.format("gone"), "5.00")  # not in the catalogue
    rows[2] = (*rows[2][:5], "", "", "")  # no recommendation: nothing to check
    write_merge_fields(rows, columns)
    with warehouse.connect() as con:
        con.execute(
            "create table stg_shop__products as select * from (values "
            "('boots', true), ('hat', false)) as t(handle, is_in_stock)"
        )
    result = quality.gate("run-stock")
    assert result.outcome == "quarantined"
    reason = "a recommended product does not exist or is out of stock"
    assert dict(query("select contact_id, reasons from quarantined_contacts")) == {
        "1": reason,
        "2": reason,
    }


def test_new_merge_fields_are_checked_once_the_models_produce_them(fresh_source):
    columns = [*COLUMNS, "BEST_SEND_HOUR", "ORDER_COUNT"]
    rows = [(*r, 9, 2) for r in contacts(100)]
    rows[5] = (*rows[5][:5], 25, 2)
    rows[6] = (*rows[6][:5], 9, -1)
    write_merge_fields(rows, columns, {"BEST_SEND_HOUR": "integer", "ORDER_COUNT": "integer"})
    result = quality.gate("run-new")
    assert dict(query("select contact_id, reasons from quarantined_contacts")) == {
        "6": "BEST_SEND_HOUR outside 0..23",
        "7": "ORDER_COUNT negative",
    }
    assert result.outcome == "quarantined"


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        ([], COLUMNS, "expect_table_row_count_to_be_between(esp_merge_fields): observed 0"),
        (
            [(None, "a@example.com", "Ada", "gold", "h"), *contacts(99)],
            COLUMNS,
            "expect_column_values_to_not_be_null(contact_id): observed 1 unexpected rows",
        ),
        (
            [r[:1] + r[2:] for r in contacts(10)],
            [c for c in COLUMNS if c != "EMAIL"],
            "expect_table_columns_to_match_set(esp_merge_fields)",
        ),
    ],
    ids=["empty table", "row without contact_id", "EMAIL column missing"],
)
def test_table_level_failures_block_the_push(fresh_source, rows, columns, expected):
    write_merge_fields(rows, columns)
    with pytest.raises(quality.QualityGateError) as err:
        quality.gate("run-table")
    assert expected in str(err.value)
    assert "nothing is pushed" in str(err.value)
    assert query("select outcome from quality_runs") == [("blocked",)]


def test_only_the_newest_runs_keep_validation_results_and_data_docs_pages(
    fresh_source, monkeypatch
):
    monkeypatch.setattr(quality, "KEEP_RUNS", 2)
    write_merge_fields(contacts(100))
    for n in range(4):
        quality.gate(f"run-{n}")
    pages = fresh_source / "gx" / "data_docs" / "validations" / "esp_merge_fields"
    assert sorted(p.name for p in pages.iterdir()) == ["run-2", "run-3"]
    results = fresh_source / "gx" / "validations" / "esp_merge_fields"
    assert sorted(p.name for p in results.iterdir()) == ["run-2", "run-3"]
    # The warehouse keeps every run's results.
    assert query("select count(distinct run_id) from quality_results") == [(4,)]
