"""A small hand-made shop, loaded into the raw tables of docs/raw_tables.md and built with real
dbt on DuckDB: every merge field of every contact was worked out by hand (see the comments).

The reference time is pinned (`as_of`), so the 72-hour, 90-day and 180-day windows are exact.
tests/test_dbt_postgres.py builds the same data on PostgreSQL and expects the same rows.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import duckdb
import pytest

from presend import load, settings, transform, warehouse

AS_OF = "2026-11-20 12:00:00"  # windows: 72 h from 11-17 12:00, 90 d from 08-22 12:00
STORE = "https://shop.example.com"
LOADED_AT = "2026-11-20 11:00:00"

# (id, email, firstname, marketing consent, loyalty tier, time zone, archived)
CONTACTS = [
    ("1", "ada@example.com", "Ada", "true", "gold", "Europe/London", False),
    # Upper case and spaces in the CRM; Auckland is UTC+13 in November.
    ("2", "  GRACE@Example.COM ", "  Grace ", "true", "silver", "Pacific/Auckland", False),
    ("3", "linus@example.com", "", "true", None, None, False),  # no data at all
    ("4", "tia@example.com", "Tia", "true", "platinum", "America/New_York", False),
    ("5", "nope@example.com", "Nope", "false", "gold", None, False),  # no consent
    ("6", "not-an-email", "Bad", "true", "gold", None, False),  # invalid email
    ("7", "gone@example.com", "Gone", "true", "gold", None, True),  # archived in the CRM
]


def _product(pid, title, category, status, variants):
    return {
        "id": pid,
        "title": title,
        "handle": title.lower().replace(" ", "-"),
        "product_type": category,
        "status": status,
        "updated_at": "2026-11-01T00:00:00Z",
        "variants": [
            {"id": pid * 10 + i, "price": price, "inventory_quantity": qty}
            for i, (price, qty) in enumerate(variants)
        ],
    }


PRODUCTS = [
    _product(101, "Trail Shoe", "Shoes", "active", [("120.00", 5)]),
    # The sold-out variant's price is not the one shown.
    _product(102, "Road Shoe", "Shoes", "active", [("99.50", 0), ("89.00", 3)]),
    _product(103, "Rain Jacket", "Jackets", "active", [("150.00", 2)]),
    _product(104, "Wool Hat", "Accessories", "active", [("18.00", 10)]),
    _product(105, "Old Boot", "Shoes", "archived", [("70.00", 4)]),  # not active
    _product(106, "Sold-out Sock", "Accessories", "active", [("5.00", 0)]),  # no stock
    _product(107, "Fleece", "Jackets", "active", [("65.00", 1)]),
    _product(108, "Draft Shoe", "Shoes", "draft", [("80.00", 9)]),  # not active
]


def _order(oid, email, created_at, lines, total, cancelled_at=None, refunds=()):
    return {
        "id": oid,
        "email": email,
        "created_at": created_at,
        "updated_at": created_at,
        "cancelled_at": cancelled_at,
        "financial_status": "refunded" if refunds else "paid",
        "currency": "EUR",
        "total_price": total,
        "line_items": [
            {
                "id": oid * 10 + i,
                "product_id": pid,
                "variant_id": pid * 10,
                "title": "x",
                "quantity": qty,
                "price": price,
            }
            for i, (pid, qty, price) in enumerate(lines)
        ],
        "refunds": [
            {
                "id": oid * 100 + i,
                "created_at": created_at,
                "transactions": [
                    {"amount": amount, "kind": "refund", "status": status}
                    for amount, status in transactions
                ],
            }
            for i, transactions in enumerate(refunds)
        ],
    }


ORDERS = [
    # Ada: 120.00 less a 20.00 refund (the failed 50.00 refund does not count) ...
    _order(
        1001,
        "ada@example.com",
        "2026-11-01T10:00:00+01:00",
        [(101, 1, "120.00")],
        "120.00",
        refunds=[[("20.00", "success"), ("50.00", "failure")]],
    ),
    # ... a cancelled order (not counted, not a purchase) ...
    _order(
        1002,
        "ada@example.com",
        "2026-10-15T08:00:00-04:00",
        [(103, 1, "150.00")],
        "150.00",
        cancelled_at="2026-10-15T09:00:00-04:00",
    ),
    # ... and an order older than 90 days: counted, but the hat may be recommended again.
    _order(1003, "Ada@Example.com", "2026-05-01T00:00:00Z", [(104, 2, "18.00")], "36.00"),
    # Grace, by an upper-case email with spaces: she bought the Road Shoe she had carted.
    _order(1004, " GRACE@EXAMPLE.COM", "2026-11-18T10:00:00Z", [(102, 1, "89.00")], "89.00"),
    # Tia: one old order, fully refunded: still an order, worth 0.00.
    _order(
        1005,
        "tia@example.com",
        "2026-06-01T12:00:00Z",
        [(107, 1, "65.00")],
        "65.00",
        refunds=[[("65.00", "success")]],
    ),
    # A shopper who is no contact: counts for the best sellers only.
    _order(
        1006,
        "stranger@example.com",
        "2026-10-01T12:00:00Z",
        [(103, 2, "150.00"), (101, 1, "120.00")],
        "420.00",
    ),
    # A contact without consent.
    _order(1007, "nope@example.com", "2026-09-01T12:00:00Z", [(104, 1, "18.00")], "18.00"),
]

# (id, type, occurred_at UTC, email, product_id)
EVENTS = [
    ("e01", "product_viewed", "2026-11-10 08:00:00", "ada@example.com", 103),
    ("e02", "product_viewed", "2026-11-11 08:00:00", "ada@example.com", 103),
    # Grace carted the Road Shoe, then bought it (order 1004, 10:00): not in the cart.
    ("e03", "added_to_cart", "2026-11-18 09:00:00", "grace@example.com", 102),
    ("e04", "added_to_cart", "2026-11-19 08:00:00", "Grace@example.com", 107),  # in the cart
    ("e05", "added_to_cart", "2026-11-16 08:00:00", "grace@example.com", 104),  # > 72 h ago
    # Grace's opens: 20:30 and 20:10 UTC are 09:xx in Auckland; 03:00 UTC is 16:00 there.
    ("e06", "email_opened", "2026-11-10 20:30:00", "GRACE@EXAMPLE.COM", None),
    ("e07", "email_opened", "2026-11-12 20:10:00", "grace@example.com", None),
    ("e08", "email_opened", "2026-11-13 03:00:00", "grace@example.com", None),
    ("e09", "email_opened", "2026-01-01 09:00:00", "grace@example.com", None),  # > 180 days
    # Tia: Jackets 3 views (3) tie with Accessories 1 add-to-cart (3); Jackets is more recent.
    ("e10", "added_to_cart", "2026-10-20 09:00:00", "tia@example.com", 104),
    ("e11", "product_viewed", "2026-11-01 10:00:00", "tia@example.com", 103),
    ("e12", "product_viewed", "2026-11-01 11:00:00", "tia@example.com", 103),
    ("e13", "product_viewed", "2026-11-01 12:00:00", "tia@example.com", 103),
    # Linus has no events; nope@ is not marketable.
    ("e14", "email_opened", "2026-11-10 08:00:00", "nope@example.com", None),
]

# Best sellers in stock (units in 90 days, then all time, then id):
#   101 Trail Shoe (2, 2), 103 Rain Jacket (2, 2), 104 Wool Hat (1, 3), 102 Road Shoe (1, 1),
#   107 Fleece (0, 1). Store-wide best-selling category: Shoes (3 units in 90 days).
DEFAULT_HOUR = 10  # config/presend.yml merge_field_defaults.BEST_SEND_HOUR


def _rec(pid):
    titles = {101: "Trail Shoe", 102: "Road Shoe", 103: "Rain Jacket", 104: "Wool Hat"}
    titles |= {107: "Fleece"}
    prices = {101: "120.00", 102: "89.00", 103: "150.00", 104: "18.00", 107: "65.00"}
    title = titles[pid]
    return (title, f"{STORE}/products/{title.lower().replace(' ', '-')}", prices[pid])


# contact_id -> merge fields, in the contract's column order (fields_hash aside).
EXPECTED = {
    # Shoes: purchase 5 > Jackets: 2 views. Bought the Trail Shoe: Road Shoe first (Shoes),
    # then best sellers; the Wool Hat bought in May may come back.
    "1": (
        "ada@example.com",
        "Ada",
        "gold",
        2,
        Decimal("136.00"),
        "2026-11-01",
        "Shoes",
        *_rec(102),
        *_rec(103),
        *_rec(104),
        "",
        0,
        DEFAULT_HOUR,
    ),
    # Shoes: purchase 5 + cart 3. Bought the Road Shoe; the Fleece is still in the cart.
    "2": (
        "grace@example.com",
        "Grace",
        "silver",
        1,
        Decimal("89.00"),
        "2026-11-18",
        "Shoes",
        *_rec(101),
        *_rec(103),
        *_rec(104),
        "Fleece",
        1,
        9,
    ),
    # Nothing known: configured defaults, the store's best-selling category and best sellers.
    "3": (
        "linus@example.com",
        "there",
        "member",
        0,
        Decimal("0.00"),
        "",
        "Shoes",
        *_rec(101),
        *_rec(102),
        *_rec(103),
        "",
        0,
        DEFAULT_HOUR,
    ),
    # The tie goes to the category engaged with most recently: Jackets.
    "4": (
        "tia@example.com",
        "Tia",
        "platinum",
        1,
        Decimal("0.00"),
        "2026-06-01",
        "Jackets",
        *_rec(103),
        *_rec(107),
        *_rec(101),
        "",
        0,
        DEFAULT_HOUR,
    ),
}

MERGE_FIELDS = [
    "EMAIL",
    "FIRST_NAME",
    "LOYALTY_TIER",
    "ORDER_COUNT",
    "LIFETIME_VALUE",
    "LAST_ORDER_DATE",
    "FAVORITE_CATEGORY",
    *[f"REC_{n}_{part}" for n in (1, 2, 3) for part in ("TITLE", "URL", "PRICE")],
    "CART_ITEM_TITLE",
    "CART_ITEM_COUNT",
    "BEST_SEND_HOUR",
]

RAW_TABLES_SQL = """
create schema if not exists raw;
create table if not exists raw.shop_orders (
    id varchar primary key, updated_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
create table if not exists raw.shop_products (
    id varchar primary key, updated_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
create table if not exists raw.events (
    id varchar primary key, occurred_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
"""


# Column order of raw_rows() per raw table (docs/raw_tables.md).
RAW_COLUMNS = {
    "crm_contacts": (
        "id",
        "lastmodifieddate",
        "archived",
        "properties",
        "_landing_file",
        "_loaded_at",
    ),
    "shop_orders": ("id", "updated_at", "record", "_landing_file", "_loaded_at"),
    "shop_products": ("id", "updated_at", "record", "_landing_file", "_loaded_at"),
    "events": ("id", "occurred_at", "record", "_landing_file", "_loaded_at"),
}


def raw_rows() -> dict[str, list[tuple]]:
    """The fixture as rows of the raw tables (docs/raw_tables.md), in column order."""
    contacts = []
    for cid, email, first, consent, tier, tz, archived in CONTACTS:
        props = {"email": email, "firstname": first, "hs_marketable_status": consent}
        props |= {"loyalty_tier": tier} if tier else {}
        props |= {"time_zone": tz} if tz else {}
        contacts.append((cid, LOADED_AT, archived, json.dumps(props), "fixture", LOADED_AT))
    events = [
        (
            eid,
            at,
            json.dumps(
                {
                    "id": eid,
                    "type": kind,
                    "occurred_at": at.replace(" ", "T") + "Z",
                    "email": email,
                    "product_id": pid,
                }
            ),
            "fixture",
            LOADED_AT,
        )
        for eid, kind, at, email, pid in EVENTS
    ]
    return {
        "crm_contacts": contacts,
        "shop_orders": [
            (str(o["id"]), LOADED_AT, json.dumps(o), "fixture", LOADED_AT) for o in ORDERS
        ],
        "shop_products": [
            (str(p["id"]), LOADED_AT, json.dumps(p), "fixture", LOADED_AT) for p in PRODUCTS
        ],
        "events": events,
    }


def load_duckdb_fixture() -> None:
    """Create the raw tables (when the load stage has not) and insert the fixture."""
    with warehouse.connect() as con:
        load.ensure_schema(con)
        con.execute(RAW_TABLES_SQL)
        for table, rows in raw_rows().items():
            cols = ", ".join(RAW_COLUMNS[table])
            marks = ", ".join("?" * len(rows[0]))
            con.executemany(f"insert into raw.{table} ({cols}) values ({marks})", rows)


def merge_fields_duckdb() -> dict[str, tuple]:
    cols = ", ".join(f'"{c}"' for c in MERGE_FIELDS)
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        rows = con.sql(f"select contact_id, {cols} from esp_merge_fields").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.fixture
def built(data_dir):
    load_duckdb_fixture()
    return transform.build(extra_vars={"as_of": AS_OF, "store_url": STORE})


def test_every_merge_field_of_every_contact_is_exactly_as_worked_out_by_hand(built):
    assert not built.failures
    assert merge_fields_duckdb() == EXPECTED


def test_fields_hash_is_the_md5_of_every_merge_field_as_the_esp_sees_it(built):
    cols = ", ".join(f'"{c}"' for c in MERGE_FIELDS)
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        rows = con.sql(f"select {cols}, fields_hash from esp_merge_fields").fetchall()
    for *values, fields_hash in rows:
        text = "|".join(str(v) for v in values)
        assert fields_hash == hashlib.md5(text.encode()).hexdigest(), values


def test_a_changed_merge_field_changes_only_that_contacts_hash(built):
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        before = dict(con.sql("select contact_id, fields_hash from esp_merge_fields").fetchall())
    with warehouse.connect() as con:
        con.execute(
            "update raw.crm_contacts set properties = json_merge_patch(properties, "
            '\'{"firstname": "Gracie"}\'), _loaded_at = _loaded_at + interval 1 hour '
            "where id = '2'"
        )
    transform.build(extra_vars={"as_of": AS_OF, "store_url": STORE})
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        after = dict(con.sql("select contact_id, fields_hash from esp_merge_fields").fetchall())
    assert {cid for cid in before if before[cid] != after[cid]} == {"2"}
