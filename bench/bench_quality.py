"""Benchmark of the quality gate at scale: `make bench-quality` (CONTACTS=1000000 by default).

Builds a warehouse with CONTACTS rows of esp_merge_fields (every merge field of the contract,
including recommendations checked against a product catalogue) plus raw sources, then runs the
whole gate (importing GX, both checkpoints, quarantine, history, Data Docs) in a fresh Python
process, as an Airflow task does, and reports its wall and CPU time and peak RSS. The budget for
the whole validation, GX's import included: 15 s and 2 GB.

Python's bytecode is cached, as in the image (pip compiles it on install) and in any venv whose
interpreter may write `__pycache__`: a warm-up gate on a small warehouse fills a cache under the
system temp dir (the shared venv is not written to). `--no-bytecode-cache` measures the slower
case where every module is compiled from source on every start (PYTHONDONTWRITEBYTECODE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

BUDGET_SECONDS = 15.0
BUDGET_RSS_MB = 2048.0

MERGE_FIELDS_SQL = """
create or replace table esp_merge_fields as
select
    cast(i as varchar) as contact_id,
    'contact' || i || '@example.com' as "EMAIL",
    (['Ada', 'Grace', 'Linus', 'there'])[1 + i % 4] as "FIRST_NAME",
    (['bronze', 'silver', 'gold', 'platinum'])[1 + i % 4] as "LOYALTY_TIER",
    cast(i % 17 as integer) as "ORDER_COUNT",
    cast(round((i % 1000) * 1.37, 2) as decimal(18, 2)) as "LIFETIME_VALUE",
    case when i % 3 = 0 then '' else '2026-10-' || lpad(cast(1 + i % 28 as varchar), 2, '0') end
        as "LAST_ORDER_DATE",
    (['shoes', 'bags', 'hats'])[1 + i % 3] as "FAVORITE_CATEGORY",
    'Product ' || (i % 500) as "REC_1_TITLE",
    'https://shop.example.com/products/p-' || (i % 500) as "REC_1_URL",
    '19.99' as "REC_1_PRICE",
    'Product ' || ((i + 1) % 500) as "REC_2_TITLE",
    'https://shop.example.com/products/p-' || ((i + 1) % 500) as "REC_2_URL",
    '29.99' as "REC_2_PRICE",
    'Product ' || ((i + 2) % 500) as "REC_3_TITLE",
    'https://shop.example.com/products/p-' || ((i + 2) % 500) as "REC_3_URL",
    '9.99' as "REC_3_PRICE",
    case when i % 5 = 0 then 'Product 7' else '' end as "CART_ITEM_TITLE",
    cast(case when i % 5 = 0 then 1 else 0 end as integer) as "CART_ITEM_COUNT",
    cast(i % 24 as integer) as "BEST_SEND_HOUR",
    md5(cast(i as varchar)) as fields_hash
from range(1, $n + 1) as t(i)
"""


def build(path: Path, contacts: int) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(MERGE_FIELDS_SQL, {"n": contacts})
        con.execute(
            "create or replace table stg_shop__products as select 'p-' || i as handle, "
            "true as is_in_stock from range(0, 500) as t(i)"
        )
        con.execute("create schema if not exists raw")
        con.execute(
            "create or replace table raw.crm_contacts as select cast(i as varchar) as id, "
            "now()::timestamp as _loaded_at from range(1, $n + 1) as t(i)",
            {"n": contacts},
        )


# The gate as the Airflow task runs it: a fresh process that imports GX, then validates.
GATE = """
import json, resource, time
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
t0, c0 = time.perf_counter(), cpu()
from presend import quality
quality.load_great_expectations()  # as gate() imports it
t1, c1 = time.perf_counter(), cpu()
r = quality.gate()
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"import": t1 - t0, "gate": t2 - t1, "import_cpu": c1 - c0, "gate_cpu": c2 - c1,
    "outcome": r.outcome, "rows": r.rows, "passed": r.passed,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_gate(data: Path, env: dict[str, str]) -> tuple[dict, float]:
    """One gate in a fresh process over the warehouse in `data`: its figures and wall time."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", GATE],
        env=env | {"PRESEND_DATA_DIR": str(data)},
        check=False,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the gate failed")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=int(os.environ.get("CONTACTS", 1_000_000)))
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile every module from source on start (PYTHONDONTWRITEBYTECODE=1)",
    )
    args = parser.parse_args(argv)
    plugins = Path(__file__).resolve().parents[1] / "plugins"
    env = os.environ | {
        "PRESEND_TASK_POOL": "warehouse",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
        "GX_ANALYTICS_ENABLED": "false",
    }
    if args.no_bytecode_cache:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "presend-bench-pycache")
    with tempfile.TemporaryDirectory(prefix="presend-bench-") as tmp:
        if not args.no_bytecode_cache:
            warm = Path(tmp) / "warm-up"
            warm.mkdir()
            build(warm / "warehouse.duckdb", 1_000)
            run_gate(warm, env)
        data = Path(tmp) / "bench"
        data.mkdir()
        t0 = time.perf_counter()
        build(data / "warehouse.duckdb", args.contacts)
        print(f"built {args.contacts:,} contacts in {time.perf_counter() - t0:.1f} s")
        r, wall = run_gate(data, env)
    total, total_cpu = r["import"] + r["gate"], r["import_cpu"] + r["gate_cpu"]
    cache = "no (compiled on start)" if args.no_bytecode_cache else "yes (warmed up)"
    print(f"gate outcome: {r['outcome']} on {r['rows']:,} rows, {r['passed']} expectations passed")
    print(f"bytecode cached: {cache}")
    print("                                      wall     CPU (user + sys)")
    print(f"  import great_expectations          {r['import']:5.1f} s  {r['import_cpu']:5.1f} s")
    print(f"  validation (the gate)              {r['gate']:5.1f} s  {r['gate_cpu']:5.1f} s")
    print(f"  whole validation (import + gate)   {total:5.1f} s  {total_cpu:5.1f} s")
    print(f"  whole process (with interpreter)   {wall:5.1f} s")
    load = os.getloadavg()[0]
    print(f"  load average during the run        {load:5.1f} (on {os.cpu_count()} CPUs)")
    print(f"  peak RSS                           {r['rss_mb']:6,.0f} MB")
    ok = r["outcome"] == "passed" and total <= BUDGET_SECONDS and r["rss_mb"] <= BUDGET_RSS_MB
    verdict = "OK" if ok else "OVER BUDGET"
    print(
        f"budget: whole validation <= {BUDGET_SECONDS:.0f} s, <= {BUDGET_RSS_MB:,.0f} MB: {verdict}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
