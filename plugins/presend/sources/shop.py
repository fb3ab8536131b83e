"""Orders and products from a Shopify Admin REST-shaped API (2024-10).

Incremental on `updated_at` (`updated_at_min` is inclusive), sorted `updated_at asc`, 250 per
page, cursor pagination in the `Link` header. Shopify meters calls with a leaky bucket (40
calls, draining 2 a second on standard plans) and reports its level on every response; the
client slows down before the bucket is full instead of collecting 429s.
"""

from __future__ import annotations

from presend.sources.extract import LinkHeaderPaginator, Stream

CONN_ID = "presend_shop"
API = "/admin/api/2024-10"


def _shopify_auth(token: str) -> dict[str, str]:
    return {"X-Shopify-Access-Token": token}


def _shop_stream(
    name: str, resource: str, params: dict, fields: tuple[str, ...], checks: tuple
) -> Stream:
    return Stream(
        name=name,
        conn_id=CONN_ID,
        endpoint=f"{API}/{resource}.json",
        paginator=LinkHeaderPaginator(),
        records_key=resource,
        cursor="updated_at",
        cursor_path=["updated_at"],
        page_size=250,
        params={"order": "updated_at asc"} | params,
        auth=_shopify_auth,
        fields=fields,
        checks=checks,
        leak_per_second=2.0,
    )


ORDERS = _shop_stream(
    "shop_orders",
    "orders",
    {"status": "any"},  # Shopify lists only open orders unless asked: cancellations count
    ("line_items", "total_price"),
    (
        ("json_type(field_line_items) is distinct from 'ARRAY'", "line_items is not a list"),
        (
            "try_cast(field_total_price ->> '$' as decimal(18, 2)) is null",
            "total_price missing or not a decimal",
        ),
    ),
)
PRODUCTS = _shop_stream(
    "shop_products",
    "products",
    {},
    ("variants",),
    (("json_type(field_variants) is distinct from 'ARRAY'", "variants is not a list"),),
)
