"""A shop shaped like the Shopify Admin REST API (2024-10): orders and products.

`GET /admin/api/2024-10/{orders,products}.json` with `updated_at_min` (inclusive), `limit`
(default 50, at most 250), `order=updated_at asc`, `status` (orders: `open` by default, `any`),
cursor pagination in the `Link` header (`rel="next"`, an opaque `page_info`; with `page_info` no
other filter is allowed), the `X-Shopify-Access-Token` header, and the leaky-bucket call limit
reported in `X-Shopify-Shop-Api-Call-Limit` (a full bucket answers 429 with `Retry-After`).

Orders belong to the CRM's contacts by email (some are guests), carry line items of the
catalogue's products, and some are cancelled or refunded. Products have a category
(`product_type`) and variants with inventory; some are out of stock.
"""

from __future__ import annotations

import base64
import json
import math
import random
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from presend.sandbox import crm
from presend.sandbox.faults import Faults, malformed_records
from presend.sandbox.table import CLOCK_START, EPOCH, Table, from_ms, mix, to_ms

API = "/admin/api/2024-10"
MAX_LIMIT = 250
DEFAULT_LIMIT = 50
SHOP_TZ = timezone(timedelta(hours=-5))  # the shop's time zone: Shopify writes local offsets
ID_BASE = 5_000_000_000  # Shopify ids are large integers

CATEGORIES = [
    "Shoes",
    "Jackets",
    "Bags",
    "Hats",
    "Socks",
    "Shirts",
    "Trousers",
    "Scarves",
    "Gloves",
    "Sunglasses",
]
ADJECTIVES = ["Classic", "Urban", "Alpine", "Coastal", "Vintage", "Everyday", "Trail", "Studio"]
COLOURS = ["Black", "Navy", "Olive", "Sand", "Red", "Grey", "White", "Teal"]


def shop_time(ms: int) -> str:
    """A timestamp as Shopify writes it: seconds, in the shop's offset."""
    return from_ms(ms).astimezone(SHOP_TZ).isoformat(timespec="seconds")


@cache
def contact_email(seed: int, i: int) -> str:
    """The CRM's email of contact i, as the CRM holds it (orders join on it)."""
    return crm.make_contact(seed, i, EPOCH)["properties"]["email"]


def make_product(seed: int, i: int) -> dict:
    rnd = random.Random(f"product-{seed}-{i}")
    pid = ID_BASE + i
    category = CATEGORIES[mix(seed, i, 1) % len(CATEGORIES)]
    title = f"{rnd.choice(ADJECTIVES)} {rnd.choice(COLOURS)} {category}"
    out_of_stock = rnd.random() < 0.15
    ts = shop_time(to_ms(EPOCH) + i * 60_000)
    variants = []
    for k in range(1, rnd.randint(1, 3) + 1):
        price = Decimal(rnd.randrange(900, 25_000)) / 100
        variants.append(
            {
                "id": pid * 10 + k,
                "product_id": pid,
                "title": ["S", "M", "L"][k - 1],
                "price": f"{price:.2f}",
                "sku": f"SKU-{i}-{k}",
                "inventory_quantity": 0 if out_of_stock else rnd.randint(0, 40),
                "updated_at": ts,
            }
        )
    roll = rnd.random()
    status = "draft" if roll < 0.05 else "archived" if roll < 0.10 else "active"
    return {
        "id": pid,
        "title": title,
        "handle": f"{title.lower().replace(' ', '-')}-{i}",
        "product_type": category,
        "vendor": "presend sandbox",
        "status": status,
        "created_at": ts,
        "updated_at": ts,
        "tags": "",
        "variants": variants,
    }


class ShopState:
    """The shop's catalogue and orders, generated from a seed; `advance` changes a share."""

    def __init__(self, seed: int, products: int, orders: int, contacts: int, token: str) -> None:
        self.seed, self.contacts, self.token = seed, max(1, contacts), token
        self.clock = CLOCK_START
        self.lock = threading.RLock()
        self.catalogue = [make_product(seed, i) for i in range(1, products + 1)]
        self.products = Table(products, lambda i: self.catalogue[i - 1], step_ms=60_000)
        self.orders = Table(orders, self._make_order, per_tick=2)
        self.bucket_size, self.leak_per_second = 40, 1000.0
        self.bucket_level, self.bucket_at = 0.0, time.monotonic()
        self.changes = 0
        self.throttled = 0  # calls answered 429 because the bucket was full

    def _make_order(self, i: int, created_ms: int | None = None) -> dict:
        rnd = random.Random(f"order-{self.seed}-{i}")
        ms = created_ms if created_ms is not None else self.orders.base_ms(i)
        contact = rnd.randint(1, self.contacts)
        if rnd.random() < 0.05:
            email = f"guest.{i}@example.net"  # a guest checkout: not in the CRM
        else:
            email = contact_email(self.seed, contact)
            if rnd.random() < 0.2:
                email = email.strip().upper()  # customers type their email their own way
        items = []
        for k in range(1, rnd.randint(1, 4) + 1):
            product = self.catalogue[rnd.randrange(len(self.catalogue))]
            variant = rnd.choice(product["variants"])
            items.append(
                {
                    "id": (ID_BASE + i) * 10 + k,
                    "product_id": product["id"],
                    "variant_id": variant["id"],
                    "title": product["title"],
                    "quantity": rnd.randint(1, 3),
                    "price": variant["price"],
                }
            )
        total = sum(Decimal(li["price"]) * li["quantity"] for li in items)
        created = shop_time(ms)
        return {
            "id": ID_BASE + i,
            "name": f"#{1000 + i}",
            "email": email,
            "created_at": created,
            "updated_at": created,
            "processed_at": created,
            "cancelled_at": None,
            "cancel_reason": None,
            "financial_status": "paid",
            "fulfillment_status": None,
            "currency": "EUR",
            "total_price": f"{total:.2f}",
            "line_items": items,
            "refunds": [],
        }

    def _change_order(self, rnd: random.Random, order: dict, now: str) -> dict:
        order = json.loads(json.dumps(order))
        roll = rnd.random()
        if roll < 0.3 and order["cancelled_at"] is None:
            order |= {
                "cancelled_at": now,
                "cancel_reason": "customer",
                "financial_status": "voided",
            }
        elif roll < 0.6 and not order["refunds"]:
            item = order["line_items"][0]
            order["refunds"].append(
                {
                    "id": order["id"] * 10 + 1,
                    "created_at": now,
                    "transactions": [
                        {"amount": item["price"], "kind": "refund", "status": "success"}
                    ],
                }
            )
            order["financial_status"] = "partially_refunded"
        else:
            order["fulfillment_status"] = "fulfilled"
        order["updated_at"] = now
        return order

    def _change_product(self, rnd: random.Random, product: dict, now: str) -> dict:
        product = json.loads(json.dumps(product))
        for variant in product["variants"]:
            variant["inventory_quantity"] = 0 if rnd.random() < 0.3 else rnd.randint(1, 40)
            variant["updated_at"] = now
        if rnd.random() < 0.2:
            variant = product["variants"][0]
            variant["price"] = f"{Decimal(variant['price']) * Decimal('0.9'):.2f}"
        product["updated_at"] = now
        return product

    def advance(self, share: float, hours: float = 1.0) -> dict:
        """Move the clock; change `share` of orders and products and add new orders."""
        with self.lock:
            self.clock += timedelta(hours=hours)
            return self.change(share, tag=f"advance-{self.clock.isoformat()}")

    def change(self, share: float, tag: str) -> dict:
        """Change `share` of the records now (also used while a client pages)."""
        with self.lock:
            self.changes += 1
            rnd = random.Random(f"{self.seed}-{tag}-{self.changes}")
            now_ms = to_ms(self.clock)
            now = shop_time(now_ms)
            orders = self.orders
            n_changed = round(share * orders.count())
            for i in rnd.sample(range(1, orders.next_index), n_changed):
                orders.put(i, now_ms, self._change_order(rnd, orders.get(i), now))
            n_new = max(1, round(n_changed / 10)) if share else 0
            for _ in range(n_new):
                i = orders.next_index
                orders.put(i, now_ms, self._make_order(i, now_ms))
            products = self.products
            n_products = round(share * products.size)
            for i in rnd.sample(range(1, products.size + 1), n_products):
                products.put(i, now_ms, self._change_product(rnd, products.get(i), now))
            return {"orders_changed": n_changed, "orders_added": n_new, "products": n_products}

    def inject(self, products: list[dict]) -> list[int]:
        """Write products as the shop's staff would, for tests of bad source data.

        Each item names a product by `id` or `handle` and sets top-level fields;
        `inventory_quantity` sets every variant's stock (0: sold out). Every written product
        is stamped one second after the last write, so the next extract brings it.
        Returns the ids written.
        """
        with self.lock:
            self.clock += timedelta(seconds=1)
            now_ms = to_ms(self.clock)
            now = shop_time(now_ms)
            written = []
            for item in products:
                fields = dict(item)
                if "id" in fields:
                    i = int(fields.pop("id")) - ID_BASE
                else:
                    handle = fields.pop("handle")
                    i = next(
                        n
                        for n in range(1, self.products.size + 1)
                        if self.products.get(n)["handle"] == handle
                    )
                product = json.loads(json.dumps(self.products.get(i)))
                stock = fields.pop("inventory_quantity", None)
                for variant in product["variants"]:
                    if stock is not None:
                        variant["inventory_quantity"] = int(stock)
                    variant["updated_at"] = now
                product |= fields | {"updated_at": now}
                self.products.put(i, now_ms, product)
                written.append(product["id"])
            return written

    def spend(self) -> tuple[bool, int, float]:
        """One call against the leaky bucket: (allowed, level after, seconds until room)."""
        with self.lock:
            now = time.monotonic()
            leaked = (now - self.bucket_at) * self.leak_per_second
            self.bucket_level = max(0.0, self.bucket_level - leaked)
            self.bucket_at = now
            if self.bucket_level + 1 > self.bucket_size:
                self.throttled += 1
                wait = (self.bucket_level + 1 - self.bucket_size) / self.leak_per_second
                return False, math.ceil(self.bucket_level), wait
            self.bucket_level += 1
            return True, math.ceil(self.bucket_level), 0.0


def _encode(state: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


def _decode(page_info: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(page_info + "=" * (-len(page_info) % 4)))


def _parse_time(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _errors(status: int, errors, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status, headers=headers)


def create_app(
    seed: int = 42,
    products: int = 200,
    orders: int = 2000,
    contacts: int = 1000,
    token: str = "sandbox-shop-token",
) -> FastAPI:
    """The shop app; `app.state.shop` holds the data and `app.state.faults` the faults."""
    app = FastAPI(title="presend sandbox shop (Shopify Admin REST shape)")
    state = ShopState(seed, products, orders, contacts, token)
    faults = Faults()
    app.state.shop, app.state.faults = state, faults

    def listing(resource: str, table: Table, request: Request):
        if request.headers.get("x-shopify-access-token") != state.token:
            return _errors(
                401, "[API] Invalid API key or access token (unrecognized login or wrong password)"
            )
        allowed, level, wait = state.spend()
        call_limit = {"X-Shopify-Shop-Api-Call-Limit": f"{level}/{state.bucket_size}"}
        if not allowed:
            retry = {"Retry-After": f"{max(1.0, math.ceil(wait)):.1f}"}
            return _errors(
                429,
                "Exceeded 2 calls per second for api client. Reduce request rates "
                "to resume uninterrupted service.",
                call_limit | retry,
            )
        q = request.query_params
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return _errors(400, {"limit": "Invalid value."})
        if not 1 <= limit <= MAX_LIMIT:
            return _errors(400, {"limit": f"must be between 1 and {MAX_LIMIT}"})
        if "page_info" in q:
            extra = set(q) - {"page_info", "limit", "fields"}
            if extra:
                return _errors(400, {"page_info": f"cannot be combined with {sorted(extra)}"})
            try:
                cursor = _decode(q["page_info"])
            except ValueError:
                return _errors(400, {"page_info": "Invalid value."})
        else:
            if q.get("order", "updated_at asc") != "updated_at asc":
                return _errors(400, {"order": "this sandbox sorts by updated_at asc only"})
            since = q.get("updated_at_min")
            try:
                since_ms = to_ms(_parse_time(since)) if since else None
            except ValueError:
                return _errors(400, {"updated_at_min": "Invalid value."})
            cursor = {"since": since_ms, "after": None, "status": q.get("status", "open")}
        after = tuple(cursor["after"]) if cursor["after"] else None
        status = cursor.get("status", "any")
        records: list[dict] = []
        keys = []
        while len(records) < limit:
            rows = table.page(cursor["since"], after, limit - len(records))
            if not rows:
                break
            for key, rec in rows:
                after = key
                if resource == "orders" and not _status_matches(rec, status):
                    continue
                records.append(rec)
                keys.append(key)
        more = bool(table.page(cursor["since"], after, 1)) if after else False
        if cursor["after"] and faults.take("duplicate"):
            # The previous page's last record again, as a shifting offset would repeat it.
            records.insert(0, table.get(cursor["after"][1]))
        if faults.take("added_field"):
            records = [r | {"presentment_currency": "EUR"} for r in records]
        if faults.take("malformed") and records:
            records = records + malformed_records("id", ["updated_at"], records[0])
        headers = dict(call_limit)
        if more:
            nxt = {"since": cursor["since"], "after": list(after), "status": status}
            url = request.url.replace_query_params(limit=limit, page_info=_encode(nxt))
            headers["Link"] = f'<{url}>; rel="next"'
        fault = faults.take("update_while_paging")
        if fault:
            state.change(float(fault.get("share", 0.05)), tag="page")
        body = json.dumps({resource: records}, separators=(",", ":")).encode()
        return Response(body, media_type="application/json", headers=headers)

    @app.get(f"{API}/orders.json")
    def list_orders(request: Request):
        return listing("orders", state.orders, request)

    @app.get(f"{API}/products.json")
    def list_products(request: Request):
        return listing("products", state.products, request)

    @app.post("/_sandbox/advance")
    async def advance(request: Request):
        body = await request.json()
        changed = state.advance(float(body.get("share", 0.1)), float(body.get("hours", 1)))
        return changed | {"clock": state.clock.isoformat()}

    @app.post("/_sandbox/inject")
    async def inject(request: Request):
        """Bad (or any) product data on demand: `{"products": [{"id"|"handle", fields...}]}`."""
        body = await request.json()
        written = state.inject(body.get("products") or [])
        return {"written": written, "clock": state.clock.isoformat()}

    @app.post("/_sandbox/call_limit")
    async def call_limit(request: Request):
        body = await request.json()
        state.bucket_size = int(body.get("bucket_size", state.bucket_size))
        state.leak_per_second = float(body.get("leak_per_second", state.leak_per_second))
        return await show_call_limit()

    @app.get("/_sandbox/call_limit")
    async def show_call_limit():
        return {
            "bucket_size": state.bucket_size,
            "leak_per_second": state.leak_per_second,
            "throttled": state.throttled,
        }

    faults.install(app)
    return app


def _status_matches(order: dict, status: str) -> bool:
    if status == "any":
        return True
    cancelled = order.get("cancelled_at") is not None
    return cancelled if status == "cancelled" else not cancelled
