"""The dbt project parses, and builds exact merge fields from a small hand-made raw table."""

from __future__ import annotations

import json

import duckdb
import pytest

from presend import config, load, settings, transform, warehouse


def test_dbt_parse_succeeds_and_the_output_contract_is_enforced(data_dir):
    proc = transform.run_dbt("parse")
    assert proc.returncode == 0
    manifest = json.loads((transform.target_dir() / "manifest.json").read_text())
    models = {n["name"]: n for n in manifest["nodes"].values() if n["resource_type"] == "model"}
    contract = models["esp_merge_fields"]["config"]["contract"]
    assert contract["enforced"] is True
    # Every merge field is never null by the contract's constraint (no not_null data tests).
    for name, column in models["esp_merge_fields"]["columns"].items():
        assert {"type": "not_null"}.items() <= column["constraints"][0].items(), name
    for name, node in models.items():
        assert node["description"], f"model {name} has no description"
        assert all(c.get("description") for c in node["columns"].values()), name


def _models() -> list[str]:
    return [p.stem for p in (settings.DBT_PROJECT_DIR / "models").rglob("*.sql")]


# (id, email, firstname, marketable, loyalty_tier, archived)
CONTACTS = [
    ("1", "ada@example.com", "Ada", "true", "gold", False),
    ("2", "  GRACE@Example.COM ", "  Grace ", "true", "silver", False),  # normalised
    ("3", "linus@example.com", "", "true", None, False),  # defaults
    ("4", "nope@example.com", "Nope", "false", "gold", False),  # no consent
    ("5", "not-an-email", "Bad", "true", "gold", False),  # invalid email
    ("6", "gone@example.com", "Gone", "true", "gold", True),  # archived in the CRM
    ("7", None, "NoMail", "true", "gold", False),  # no email at all
]


def _raw_contacts() -> None:
    with warehouse.connect() as con:
        load.ensure_schema(con)
        for cid, email, first, marketable, tier, archived in CONTACTS:
            props = {"email": email, "firstname": first, "hs_marketable_status": marketable}
            if tier:
                props["loyalty_tier"] = tier
            con.execute(
                "insert into raw.crm_contacts values (?, now()::timestamp, ?, ?, 'test', "
                "now()::timestamp)",
                [cid, archived, json.dumps(props)],
            )


def test_merge_fields_are_exact_for_hand_made_contacts(data_dir):
    _raw_contacts()
    # Only the CRM has been synced: the shop and events tables do not exist yet.
    result = transform.build()
    assert not result.failures
    assert result.models_built == len(_models())
    defaults = config.load().merge_field_defaults
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        rows = con.sql(
            'select contact_id, "EMAIL", "FIRST_NAME", "LOYALTY_TIER" from esp_merge_fields '
            "order by contact_id"
        ).fetchall()
        hashes = con.execute("select count(distinct fields_hash) from esp_merge_fields").fetchone()
    assert rows == [
        ("1", "ada@example.com", "Ada", "gold"),
        ("2", "grace@example.com", "Grace", "silver"),
        ("3", "linus@example.com", defaults["FIRST_NAME"], defaults["LOYALTY_TIER"]),
    ]
    assert hashes == (3,)
    # The warehouse enforces the contract: a null merge field cannot be written.
    with (
        duckdb.connect(str(settings.warehouse_path())) as con,
        pytest.raises(duckdb.ConstraintException, match="FIRST_NAME"),
    ):
        con.execute(
            'insert into esp_merge_fields by name select * replace (null as "FIRST_NAME") '
            "from esp_merge_fields limit 1"
        )
    # So do the marts' contracts (their not-null columns and the recommendation rank).
    with duckdb.connect(str(settings.warehouse_path())) as con:
        with pytest.raises(duckdb.ConstraintException, match="is_marketable"):
            con.execute(
                "insert into customer_profile by name select * replace (null as is_marketable) "
                "from customer_profile limit 1"
            )
        with pytest.raises(duckdb.ConstraintException, match="recommendation_rank"):
            con.execute(
                "insert into customer_recommendations (recommendation_id, contact_id, "
                "recommendation_rank, product_id) values ('1-4', '1', 4, '101')"
            )
        con.execute(
            "insert into customer_recommendations (recommendation_id, contact_id, "
            "recommendation_rank, product_id) values ('1-3', '1', 3, '101')"
        )


def test_a_missing_merge_field_default_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    _raw_contacts()
    cfg = tmp_path / "presend.yml"
    cfg.write_text(settings.CONFIG_FILE.read_text().replace('  LOYALTY_TIER: "member"\n', ""))
    monkeypatch.setattr(settings, "CONFIG_FILE", cfg)
    with pytest.raises(transform.DbtBuildError) as err:
        transform.build()
    assert "esp_merge_fields" in str(err.value)
    assert "merge field default for LOYALTY_TIER is not configured" in str(err.value)
