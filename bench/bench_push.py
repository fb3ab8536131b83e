"""Push benchmark: 100k changed contacts against the sandbox ESP with a configured rate limit.

    make bench-push                       # SendGrid shape, 5,000 contacts/batch, 1 request/s
    .venv/bin/python bench/bench_push.py --vendor klaviyo --contacts 50000

A warm-up push (no rate limit) makes the ESP hold every contact; then every contact changes
and the measured push sends them with the write endpoint limited to `--rate` requests per
`--window` seconds. Checks: throughput at least 90% of the limit (contacts/s the limit allows
at full batches), batches at least 95% full, and a second run sends nothing. Exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

import requests

from presend import push, settings, warehouse
from presend.esp import make_adapter
from presend.sandbox.esp import KLAVIYO_IMPORT, SENDGRID_UPSERT
from presend.sandbox.server import ESP_API_KEY, Sandbox

WRITE = {"sendgrid": SENDGRID_UPSERT, "klaviyo": KLAVIYO_IMPORT}
TIERS = "['bronze', 'silver', 'gold', 'platinum']"


def build_merge_fields(contacts: int, version: int) -> None:
    """esp_merge_fields with the full column set; `version` changes some fields of every row."""
    with warehouse.connect() as con:
        con.execute(
            f"""
            create or replace table esp_merge_fields as
            with base as (
                select
                    lpad(i::varchar, 8, '0') as contact_id,
                    'bench' || i || '@example.com' as "EMAIL",
                    'Name' || (i % 500) as "FIRST_NAME",
                    {TIERS}[1 + i % 4] as "LOYALTY_TIER",
                    (i % 17 + {version})::varchar as "ORDER_COUNT",
                    (round((i % 997) * 1.37 + {version}, 2))::decimal(12, 2)::varchar
                        as "LIFETIME_VALUE",
                    (date '2026-01-01' + (i % 300)::int)::varchar as "LAST_ORDER_DATE",
                    'Category ' || (i % 23) as "FAVORITE_CATEGORY",
                    'Product ' || (i % 101) as "REC_1_TITLE",
                    'https://shop.example.com/products/p' || (i % 101) as "REC_1_URL",
                    ((i % 101) + 0.99)::varchar as "REC_1_PRICE",
                    ((i + {version}) % 24)::varchar as "BEST_SEND_HOUR"
                from range(1, {contacts} + 1) as t(i)
            )
            select *, md5(to_json(base)::varchar) as fields_hash
            from base
            """
        )


class Wire:
    """Write requests on the wire: how many records each carried and their bytes."""

    def __init__(self, adapter, vendor: str) -> None:
        self.vendor = vendor
        self.batches: list[tuple[int, int]] = []
        self.first = self.last = 0.0
        adapter.http.hooks["response"].append(self._record)

    def _record(self, resp, *args, **kwargs) -> None:
        if resp.request.method in ("PUT", "POST") and resp.status_code == 202:
            body = json.loads(resp.request.body)
            if self.vendor == "sendgrid":
                n = len(body["contacts"])
            else:
                n = len(body["data"]["attributes"]["profiles"]["data"])
            self.batches.append((n, len(resp.request.body)))
            self.first = self.first or time.monotonic()
            self.last = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_push")
    parser.add_argument("--vendor", choices=sorted(WRITE), default="sendgrid")
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5_000, help="esp.batch_max_contacts")
    parser.add_argument("--rate", type=int, default=1, help="write requests per window")
    parser.add_argument("--window", type=int, default=1, help="rate-limit window, seconds")
    args = parser.parse_args(argv)

    data = Path(tempfile.mkdtemp(prefix="presend-bench-"))
    os.environ["PRESEND_DATA_DIR"] = str(data)
    os.environ["PRESEND_TASK_POOL"] = settings.WAREHOUSE_POOL
    limit = args.rate * args.batch / args.window  # contacts/s at full batches
    print(
        f"bench-push: {args.contacts} contacts, {args.vendor}, batches of {args.batch}, "
        f"rate limit {args.rate} request(s)/{args.window}s = {limit:.0f} contacts/s"
    )
    with Sandbox(contacts=10) as sandbox:

        def adapter():
            return make_adapter(
                args.vendor,
                sandbox.esp_url,
                ESP_API_KEY,
                max_batch_contacts=args.batch,
                poll_interval=0.02,
            )

        build_merge_fields(args.contacts, version=0)
        t = time.monotonic()
        warm = push.push(adapter())
        print(f"  warm-up    {warm.pushed} contacts new to the ESP in {time.monotonic() - t:.1f}s")

        build_merge_fields(args.contacts, version=1)
        requests.post(
            f"{sandbox.esp_url}/_sandbox/faults",
            json={"rate_limits": {WRITE[args.vendor]: [args.rate, args.window]}},
            timeout=30,
        ).raise_for_status()
        measured = adapter()
        wire = Wire(measured, args.vendor)
        t = time.monotonic()
        result = push.push(measured)
        elapsed = time.monotonic() - t
        counts = requests.get(f"{sandbox.esp_url}/_sandbox/requests", timeout=30).json()
        writes_before = counts.get(WRITE[args.vendor], 0)

        again = push.push(adapter())
        counts = requests.get(f"{sandbox.esp_url}/_sandbox/requests", timeout=30).json()
        second_writes = counts.get(WRITE[args.vendor], 0) - writes_before

    throughput = result.pushed / elapsed
    full = [n / measured.max_batch_contacts for n, _ in wire.batches]
    # The last batch holds the remainder: only the others must be full.
    fill = min(full[:-1] or full)
    print(f"  measured   {result.changed} changed contacts, {result.pushed} acknowledged")
    print(
        f"  throughput {throughput:.0f} contacts/s over the whole push ({elapsed:.1f}s) = "
        f"{throughput / limit:.1%} of the limit"
    )
    print(
        f"  batches    {len(wire.batches)}, fill min {fill:.1%} (all but the last), "
        f"mean {sum(full) / len(full):.1%}, largest body {max(b for _, b in wire.batches)} bytes"
    )
    print(
        f"  limiter    waited {measured.client.limiter.waited:.1f}s on the vendor's headers; "
        f"{writes_before - len(wire.batches) - warm.batches} write requests answered 429"
    )
    print(f"  second run {again.pushed} contacts pushed, {second_writes} write requests")
    ok = throughput >= 0.9 * limit and fill >= 0.95 and again.pushed == 0 and not second_writes
    print("bench-push: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
