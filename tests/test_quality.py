"""The Great Expectations gate from expectations/ over esp_merge_fields."""

from __future__ import annotations

import pytest

from presend import quality, warehouse

GOOD = [
    ("1", "ada@example.com", "Ada", "gold", "h1"),
    ("2", "grace@example.com", "Grace", "silver", "h2"),
    ("3", "linus@example.com", "there", "member", "h3"),
]


def _merge_fields(rows) -> None:
    with warehouse.connect() as con:
        con.execute(
            'create or replace table esp_merge_fields (contact_id varchar, "EMAIL" varchar, '
            '"FIRST_NAME" varchar, "LOYALTY_TIER" varchar, fields_hash varchar)'
        )
        if rows:
            con.executemany("insert into esp_merge_fields values (?, ?, ?, ?, ?)", rows)


def test_good_merge_fields_pass_and_data_docs_are_built(data_dir):
    _merge_fields(GOOD)
    result = quality.gate()
    assert result.failed == 0 and result.passed >= 10
    assert result.rows == 3
    index = data_dir / "gx" / "data_docs" / "index.html"
    assert str(index) == result.data_docs
    assert "esp_merge_fields" in index.read_text()


def test_a_duplicate_contact_and_a_bad_email_block_the_push_with_reasons(data_dir):
    _merge_fields(
        [
            *GOOD,
            ("1", "ada.two@example.com", "Ada", "gold", "h4"),
            ("5", "no-at-sign.example.com", "Bad", "gold", "h5"),
        ]
    )
    with pytest.raises(quality.QualityGateError) as err:
        quality.gate()
    message = str(err.value)
    assert "expect_column_values_to_be_unique({'column': 'contact_id'" in message
    assert "expect_column_values_to_match_regex({'column': 'EMAIL'" in message
    assert "observed 1 unexpected rows" in message
    assert "Data Docs:" in message
    # The failure names counts, never customer emails.
    assert "no-at-sign.example.com" not in message and "ada.two" not in message


def test_an_empty_table_is_a_critical_failure(data_dir):
    _merge_fields([])
    with pytest.raises(quality.QualityGateError, match="expect_table_row_count_to_be_between"):
        quality.gate()
