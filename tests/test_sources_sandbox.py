"""The sandbox shop and events APIs behave like the vendors they stand for (Shopify Admin REST,
an analytics export with a cursor). Every call goes over HTTP to the sandbox on 127.0.0.1."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import requests

from presend.sandbox import crm, events, shop
from presend.sandbox.server import EVENTS_TOKEN, SHOP_TOKEN, Sandbox

SIZES = {"contacts": 200, "orders": 400, "products": 40, "events": 2000}
ORDERS = f"{shop.API}/orders.json"
PRODUCTS = f"{shop.API}/products.json"
SHOP_AUTH = {"X-Shopify-Access-Token": SHOP_TOKEN}
EVENTS_AUTH = {"Authorization": f"Bearer {EVENTS_TOKEN}"}


def shop_get(url: str, headers: dict | None = SHOP_AUTH, **params) -> requests.Response:
    return requests.get(url, params=params, headers=headers, timeout=30)


def shop_all(base: str, path: str, **params) -> list[dict]:
    """Every record of a Shopify listing, following `Link: rel="next"`."""
    resource = path.rsplit("/", 1)[1].removesuffix(".json")
    resp = shop_get(f"{base}{path}", **params)
    out = []
    while True:
        assert resp.status_code == 200, resp.text
        out += resp.json()[resource]
        nxt = resp.links.get("next", {}).get("url")
        if not nxt:
            return out
        resp = shop_get(nxt)


def events_all(base: str, **params) -> list[dict]:
    out = []
    while True:
        resp = requests.get(f"{base}{events.PATH}", params=params, headers=EVENTS_AUTH, timeout=30)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        out += page["data"]
        if not page["next_cursor"]:
            return out
        params = {"cursor": page["next_cursor"], "limit": params.get("limit", 1000)}


def utc(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def key(rec: dict, field: str) -> tuple[datetime, str]:
    return utc(rec[field]), str(rec["id"]).rjust(20)


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    """One sandbox for the tests that only read."""
    with Sandbox(seed=5, esp_state=tmp_path_factory.mktemp("esp") / "esp.json", **SIZES) as s:
        yield s


@pytest.fixture
def fresh(tmp_path):
    """A sandbox of its own, for tests that change the data."""
    with Sandbox(seed=5, esp_state=tmp_path / "esp.json", **SIZES) as s:
        yield s


# ---------------------------------------------------------------------------------------------
# shop: Shopify Admin REST shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"X-Shopify-Access-Token": "wrong"}])
def test_shop_without_the_access_token_is_401(sb, headers):
    resp = shop_get(f"{sb.shop_url}{ORDERS}", headers=headers)
    assert resp.status_code == 401
    assert "errors" in resp.json()


@pytest.mark.parametrize(("limit", "status"), [(0, 400), (251, 400), (250, 200), (1, 200)])
def test_shop_limit_is_1_to_250(sb, limit, status):
    assert shop_get(f"{sb.shop_url}{ORDERS}", limit=limit).status_code == status


def test_shop_default_page_is_50_with_a_link_to_the_next(sb):
    resp = shop_get(f"{sb.shop_url}{ORDERS}")
    assert len(resp.json()["orders"]) == shop.DEFAULT_LIMIT
    assert 'rel="next"' in resp.headers["Link"]
    assert "page_info=" in resp.links["next"]["url"]


@pytest.mark.parametrize("path", [ORDERS, PRODUCTS])
def test_shop_link_paging_returns_every_record_once_in_updated_at_order(sb, path):
    records = shop_all(sb.shop_url, path, limit=37, status="any")
    size = SIZES["orders"] if path == ORDERS else SIZES["products"]
    assert sorted(r["id"] for r in records) == [shop.ID_BASE + i for i in range(1, size + 1)]
    assert records == sorted(records, key=lambda r: key(r, "updated_at"))


def test_shop_page_info_cannot_be_combined_with_filters(sb):
    nxt = shop_get(f"{sb.shop_url}{ORDERS}", limit=5).links["next"]["url"]
    resp = requests.get(nxt, params={"status": "any"}, headers=SHOP_AUTH, timeout=30)
    assert resp.status_code == 400
    assert "page_info" in resp.json()["errors"]


def test_shop_updated_at_min_is_inclusive_and_accepts_offsets(sb):
    everything = shop_all(sb.shop_url, ORDERS, limit=250, status="any")
    pivot = everything[len(everything) // 2]["updated_at"]  # e.g. 2026-01-03T07:20:00-05:00
    assert pivot.endswith("-05:00")  # Shopify writes the shop's local offset
    since = shop_all(sb.shop_url, ORDERS, limit=250, status="any", updated_at_min=pivot)
    expected = [r for r in everything if utc(r["updated_at"]) >= utc(pivot)]
    assert since == expected
    assert sum(r["updated_at"] == pivot for r in since) >= 2  # records share a second
    as_utc = utc(pivot).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert shop_all(sb.shop_url, ORDERS, limit=250, status="any", updated_at_min=as_utc) == since


def test_shop_reports_the_call_limit_and_answers_429_with_retry_after_when_full(fresh):
    resp = shop_get(f"{fresh.shop_url}{ORDERS}", limit=1)
    used, size = resp.headers["X-Shopify-Shop-Api-Call-Limit"].split("/")
    assert int(size) == 40 and 1 <= int(used) <= 40
    requests.post(
        f"{fresh.shop_url}/_sandbox/call_limit",
        json={"bucket_size": 3, "leak_per_second": 0.5},
        timeout=10,
    )
    answers = [shop_get(f"{fresh.shop_url}{ORDERS}", limit=1) for _ in range(6)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(r.status_code in (200, 429) for r in answers)
    assert float(limited[0].headers["Retry-After"]) >= 1.0
    assert limited[0].headers["X-Shopify-Shop-Api-Call-Limit"].endswith("/3")


def test_orders_belong_to_crm_contacts_by_email_and_to_catalogue_products(sb):
    orders = shop_all(sb.shop_url, ORDERS, limit=250, status="any")
    contacts = {
        crm.make_contact(5, i, crm.EPOCH)["properties"]["email"].strip().lower()
        for i in range(1, SIZES["contacts"] + 1)
    }
    emails = [o["email"].strip().lower() for o in orders]
    known = sum(e in contacts for e in emails)
    assert 0.85 * len(orders) <= known < len(orders)  # mostly contacts, some guests
    assert any(o["email"] != o["email"].strip().lower() for o in orders)  # as typed
    products = {p["id"]: p for p in shop_all(sb.shop_url, PRODUCTS, limit=250)}
    for o in orders:
        assert o["line_items"]
        total = Decimal(0)
        for li in o["line_items"]:
            variants = {v["id"] for v in products[li["product_id"]]["variants"]}
            assert li["variant_id"] in variants
            total += Decimal(li["price"]) * li["quantity"]
        assert Decimal(o["total_price"]) == total


def test_products_have_categories_variants_and_some_are_out_of_stock(sb):
    products = shop_all(sb.shop_url, PRODUCTS, limit=250)
    assert {p["product_type"] for p in products} <= set(shop.CATEGORIES)
    assert len({p["product_type"] for p in products}) >= 5

    def in_stock(p: dict) -> bool:
        return any(v["inventory_quantity"] > 0 for v in p["variants"])

    assert 0 < sum(not in_stock(p) for p in products) < len(products) / 2
    assert {p["status"] for p in products} <= {"active", "draft", "archived"}
    assert all(Decimal(v["price"]) > 0 for p in products for v in p["variants"])


def test_shop_advance_cancels_refunds_and_adds_orders_stamped_with_the_clock(fresh):
    before = shop_all(fresh.shop_url, ORDERS, limit=250, status="any")
    assert not any(o["cancelled_at"] or o["refunds"] for o in before)
    resp = requests.post(f"{fresh.shop_url}/_sandbox/advance", json={"share": 0.1}, timeout=30)
    changed = resp.json()
    clock = utc(changed["clock"])
    after = shop_all(fresh.shop_url, ORDERS, limit=250, status="any")
    stamped = [o for o in after if utc(o["updated_at"]) == clock]
    assert len(stamped) == changed["orders_changed"] + changed["orders_added"]
    assert len(after) == len(before) + changed["orders_added"]
    cancelled = [o for o in after if o["cancelled_at"]]
    refunded = [o for o in after if o["refunds"]]
    assert cancelled and refunded
    for o in refunded:
        (txn,) = o["refunds"][0]["transactions"]
        assert (txn["kind"], txn["status"]) == ("refund", "success")
        assert Decimal(txn["amount"]) > 0
    # Shopify lists open orders unless asked for `status=any`.
    open_orders = shop_all(fresh.shop_url, ORDERS, limit=250)
    assert len(open_orders) == len(after) - len(cancelled)
    products = shop_all(fresh.shop_url, PRODUCTS, limit=250)
    assert sum(utc(p["updated_at"]) == clock for p in products) == changed["products"]


def test_shop_inject_sells_a_product_out_and_the_next_incremental_query_brings_it(fresh):
    product = shop_all(fresh.shop_url, PRODUCTS, limit=250)[3]
    assert any(v["inventory_quantity"] > 0 for v in product["variants"])
    resp = requests.post(
        f"{fresh.shop_url}/_sandbox/inject",
        json={"products": [{"handle": product["handle"], "inventory_quantity": 0}]},
        timeout=30,
    )
    assert resp.json()["written"] == [product["id"]]
    (changed,) = shop_all(fresh.shop_url, PRODUCTS, updated_at_min=resp.json()["clock"])
    assert changed["id"] == product["id"] and changed["title"] == product["title"]
    assert [v["inventory_quantity"] for v in changed["variants"]] == [0] * len(product["variants"])


def test_the_same_seed_gives_the_same_shop():
    a = shop.ShopState(9, 30, 50, 40, "t")
    b = shop.ShopState(9, 30, 50, 40, "t")
    assert a.orders.all_records() == b.orders.all_records()
    assert a.products.all_records() == b.products.all_records()
    c = shop.ShopState(10, 30, 50, 40, "t")
    assert a.orders.all_records() != c.orders.all_records()


# ---------------------------------------------------------------------------------------------
# events: analytics export with a cursor
# ---------------------------------------------------------------------------------------------


def test_events_without_the_bearer_token_is_401(sb):
    resp = requests.get(f"{sb.events_url}{events.PATH}", timeout=30)
    assert resp.status_code == 401


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": events.MAX_LIMIT + 1}, {"since": "yesterday"}],
)
def test_events_bad_parameters_are_400(sb, params):
    resp = requests.get(
        f"{sb.events_url}{events.PATH}", params=params, headers=EVENTS_AUTH, timeout=30
    )
    assert resp.status_code == 400


def test_events_cursor_paging_returns_every_event_once_in_time_order(sb):
    got = events_all(sb.events_url, limit=333)
    assert len(got) == len({e["id"] for e in got}) == SIZES["events"]
    assert got == sorted(got, key=lambda e: (utc(e["occurred_at"]), e["id"]))


def test_events_since_is_inclusive(sb):
    everything = events_all(sb.events_url, limit=1000)
    pivot = everything[700]["occurred_at"]
    got = events_all(sb.events_url, limit=1000, since=pivot)
    assert got == [e for e in everything if utc(e["occurred_at"]) >= utc(pivot)]
    assert sum(e["occurred_at"] == pivot for e in got) >= 2


def test_events_name_crm_contacts_and_catalogue_products(sb):
    got = events_all(sb.events_url, limit=1000)
    contacts = {
        crm.make_contact(5, i, crm.EPOCH)["properties"]["email"].strip().lower()
        for i in range(1, SIZES["contacts"] + 1)
    }
    assert {e["email"] for e in got} <= contacts
    assert {e["type"] for e in got} == {"product_viewed", "added_to_cart", "email_opened"}
    product_ids = {shop.ID_BASE + i for i in range(1, SIZES["products"] + 1)}
    for e in got:
        if e["type"] == "email_opened":
            assert e["product_id"] is None
        else:
            assert e["product_id"] in product_ids


def test_the_events_export_serves_each_record_exactly_as_the_table_holds_it():
    """The export writes base events' JSON text directly (it serves millions); the text must be
    what json.dumps of the record gives, for base and newly added events alike."""
    state = events.EventsState(seed=5, size=3000, contacts=50, products=7, token="t")
    state.advance(0.1)
    keys = state.table.page_keys(None, None, 10_000)
    assert len(keys) == 3300
    for k in keys:
        assert state.record_json(k) == json.dumps(state.table.get(k[1]), separators=(",", ":"))


def test_events_advance_adds_new_events_after_the_old_clock(fresh):
    before = events_all(fresh.events_url, limit=5000)
    resp = requests.post(f"{fresh.events_url}/_sandbox/advance", json={"share": 0.1}, timeout=30)
    added = resp.json()["added"]
    after = events_all(fresh.events_url, limit=5000)
    assert added == 0.1 * SIZES["events"]
    assert after[: len(before)] == before  # events never change
    assert len(after) == len(before) + added
    newest_before = max(utc(e["occurred_at"]) for e in before)
    assert all(utc(e["occurred_at"]) > newest_before for e in after[len(before) :])


# ---------------------------------------------------------------------------------------------
# faults on demand
# ---------------------------------------------------------------------------------------------


def test_an_unknown_fault_is_refused(sb):
    resp = requests.post(f"{sb.shop_url}/_sandbox/faults", json={"kind": "meteor"}, timeout=10)
    assert resp.status_code == 400


def test_an_armed_status_fault_answers_once_per_count_then_the_api_recovers(fresh):
    requests.post(
        f"{fresh.events_url}/_sandbox/faults",
        json={"kind": "status", "status": 503, "count": 2, "retry_after": 1},
        timeout=10,
    )
    answers = [
        requests.get(f"{fresh.events_url}{events.PATH}", headers=EVENTS_AUTH, timeout=30)
        for _ in range(3)
    ]
    assert [r.status_code for r in answers] == [503, 503, 200]
    assert answers[0].headers["Retry-After"] == "1"
