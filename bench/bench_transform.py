"""Benchmark of the dbt transform: a full refresh against an incremental run after 1% of the
contacts changed (with 1% more orders and events), on synthetic raw tables shaped like
docs/raw_tables.md.

    .venv/bin/python bench/bench_transform.py --contacts 1000000 --events 10000000 \
        --repeat 5 --full-refreshes 3

Prints the seconds of each `dbt build` (models, snapshot and tests, as the pipeline runs it)
and the ratio incremental / full refresh (the goal: at most 0.10; also in dbt's own time and
in CPU time) of their medians, and checks that the incremental path gives the same
esp_merge_fields as a full refresh. This machine is shared and its speed drifts over minutes:
with --full-refreshes, full refreshes alternate with the incremental runs, so the drift falls
on both sides of the ratio.

The incremental builds are the pipeline's hourly ones, which leave the warehouse's compaction to
the first build of each day (transform.build, transform.compact_every_hours); one incremental
build that compacts is timed at the end too (--compact: all of them compact).

Each build runs as the pipeline's transform task runs it under presend's LocalExecutor: a fork
of a process that has imported dbt, warmed it up and parsed the project with the run's vars
(transform.run_dbt, preload_dbt, parse_for_forks), as the scheduler does for every sync.
PRESEND_DBT_FORK=0 runs a new `dbt` executable per build instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

import duckdb

from presend import settings

# The first build runs an hour before the later ones: the 72-hour, 90-day and 180-day
# windows move by an hour between the runs, as between two hourly syncs.
FIRST_AS_OF = "2026-11-20 11:00:00"
AS_OF = "2026-11-20 12:00:00"
FIRST_LOAD = "2026-11-19 00:00:00"
SECOND_LOAD = "2026-11-20 10:00:00"
PRODUCTS = 2000

RAW_SQL = """
create schema if not exists raw;
create or replace table raw.crm_contacts as
select
    cast(i as varchar) as id,
    timestamp '2026-11-01' + to_seconds(i % 86400) as lastmodifieddate,
    false as archived,
    json_object(
        'email', 'c' || i || '@example.com',
        'firstname', 'Name' || i,
        'hs_marketable_status', case when i % 12 = 0 then 'false' else 'true' end,
        'loyalty_tier', ['bronze', 'silver', 'gold', 'platinum'][i % 4 + 1],
        'time_zone', ['UTC', 'Europe/Berlin', 'America/New_York', 'Pacific/Auckland'][i % 4 + 1]
    ) as properties,
    'bench' as _landing_file,
    -- Loaded over many earlier loads (one row each here), the newest at `first`.
    timestamp '{first}' - to_microseconds({contacts} - 1 - i) as _loaded_at
from range({contacts}) as t(i);

create or replace table raw.shop_products as
select
    cast(i as varchar) as id,
    timestamp '2026-11-01' as updated_at,
    json_object(
        'id', i, 'title', 'Product ' || i, 'handle', 'product-' || i,
        'product_type', 'category-' || (i % 40), 'status', 'active',
        'variants', json_array(json_object(
            'id', i * 10, 'price', cast(i % 100 + 0.99 as varchar),
            'inventory_quantity', i % 7
        ))
    ) as record,
    'bench' as _landing_file,
    timestamp '{first}' as _loaded_at
from range({products}) as t(i);

create or replace table raw.shop_orders as {orders_select};
create or replace table raw.events as {events_select};
"""

ORDERS_SELECT = """
select
    cast(i as varchar) as id,
    timestamp '2026-11-01' as updated_at,
    json_object(
        'id', i,
        'email', 'c' || {contact} || '@example.com',
        'created_at', strftime(
            timestamp '{as_of}' - to_seconds(hash(i, 1) % (400 * 86400)) - interval 1 minute,
            '%Y-%m-%dT%H:%M:%SZ'),
        'updated_at', '2026-11-01T00:00:00Z',
        'cancelled_at', case when i % 20 = 0 then '2026-11-01T00:00:00Z' end,
        'financial_status', 'paid', 'currency', 'EUR',
        'total_price', cast((i % 200) + 0.5 as varchar),
        'line_items', json_array(
            json_object('id', i * 10, 'product_id', {popular_2},
                        'variant_id', 1, 'title', 'x', 'quantity', 1, 'price', '10.00'),
            json_object('id', i * 10 + 1, 'product_id', {popular_3},
                        'variant_id', 1, 'title', 'x', 'quantity', 2, 'price', '5.00')
        ),
        'refunds', json_array()
    ) as record,
    'bench' as _landing_file,
    -- Loaded over many earlier loads (one row each here), the newest at `loaded`.
    timestamp '{loaded}' - to_microseconds({stop} - 1 - i) as _loaded_at
from range({start}, {stop}) as t(i)
"""

# Events arrive in the order they happened, as presend's extractor pages them (by their
# occurred_at cursor) into the raw table: `window` seconds up to a minute before `as_of`.
EVENTS_SELECT = """
select
    'e' || i as id,
    timestamp '{as_of}' - interval 1 minute
        - to_seconds(({stop} - 1 - i) * {window} // ({stop} - {start})) as occurred_at,
    json_object(
        'id', 'e' || i,
        'type', ['product_viewed', 'added_to_cart', 'email_opened'][i % 3 + 1],
        'email', 'c' || {contact} || '@example.com',
        'product_id', case when i % 3 <> 2 then {popular_2} end
    ) as record,
    'bench' as _landing_file,
    -- Loaded over many earlier loads (one row each here), the newest at `loaded`.
    timestamp '{loaded}' - to_microseconds({stop} - 1 - i) as _loaded_at
from range({start}, {stop}) as t(i)
"""


# Product popularity is skewed as in a real store (a few products sell most): product k is
# chosen with a probability falling like k^-3/4, so best-seller ranks are not a tie that
# 1% more orders reshuffles.
POPULAR = "cast(floor({products} * pow((hash(i, {seed}) % 1000003) / 1000003.0, 4)) as bigint)"


# Whose orders and events: any contact (the first load), or only the changed 1% (later loads).
ANY_CONTACT = "(hash(i) % {contacts})"
CHANGED_CONTACT = "(hash(i) % ({contacts} // 100) * 100)"


def _fmt(contacts: int, **more: str) -> dict:
    return {
        "contacts": contacts,
        "contact": ANY_CONTACT.format(contacts=contacts),
        "products": PRODUCTS,
        "as_of": AS_OF,
        "popular_2": POPULAR.format(products=PRODUCTS, seed=2),
        "popular_3": POPULAR.format(products=PRODUCTS, seed=3),
    } | more


def generate(contacts: int, events: int) -> None:
    orders = 2 * contacts
    fmt = _fmt(contacts, first=FIRST_LOAD)
    sql = RAW_SQL.format(
        **fmt,
        orders_select=ORDERS_SELECT.format(**fmt, loaded=FIRST_LOAD, start=0, stop=orders),
        events_select=EVENTS_SELECT.format(
            **fmt, loaded=FIRST_LOAD, start=0, stop=events, window=200 * 86400
        ),
    )
    with duckdb.connect(str(settings.warehouse_path())) as con:
        con.execute(sql)


def change_one_percent(contacts: int, events: int, spread: bool = False) -> None:
    """What a later load merges: 1% of contacts changed — their CRM record, and 1% more orders
    and events, all theirs (`spread`: the new orders and events of any contact) — and the
    stock of 1% of the products changed (two of them, in the long tail, sold out)."""
    orders = 2 * contacts
    fmt = _fmt(contacts, loaded=SECOND_LOAD)
    if not spread:
        fmt["contact"] = CHANGED_CONTACT.format(contacts=contacts)
    with duckdb.connect(str(settings.warehouse_path())) as con:
        con.execute(
            "update raw.crm_contacts set properties = json_merge_patch(properties, "
            '\'{"firstname": "Changed"}\'), _loaded_at = ? where cast(id as bigint) % 100 = 0',
            [SECOND_LOAD],
        )
        con.execute(
            "update raw.shop_products set record = json_merge_patch(record, json_object("
            "'variants', json_array(json_object('id', cast(id as bigint) * 10, "
            "'price', record->>'$.variants[0].price', 'inventory_quantity', "
            "case when id in ('1507', '1907') or cast(id as bigint) % 7 = 0 then 0 "
            "else cast(id as bigint) % 7 + 3 end)))), "
            "_loaded_at = ? where cast(id as bigint) % 100 = 7",
            [SECOND_LOAD],
        )
        con.execute(
            "insert into raw.shop_orders "
            + ORDERS_SELECT.format(**fmt, start=orders, stop=orders + orders // 100)
        )
        con.execute(
            "insert into raw.events "
            # New events happened since the last load (the last 12 hours).
            + EVENTS_SELECT.format(
                **fmt, start=events, stop=events + events // 100, window=12 * 3600
            )
        )


def timed_build(
    label: str, *args: str, as_of: str = AS_OF, compact: bool | None = None
) -> tuple[float, float, float]:
    """Seconds of the build, of dbt's own run, and of CPU (user + system) of its process.
    `compact`: as transform.build (None: a full refresh compacts)."""
    from presend import transform

    # As in a deployment that ran before with the same vars, dbt parses the project partially
    # (a changed `as_of` var would make it parse everything, which no real sync pays).
    transform.run_dbt("parse", extra_vars={"as_of": as_of})
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    transform.build(*args, *transform.SYNC_BUILD_ARGS, extra_vars={"as_of": as_of}, compact=compact)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu_after.ru_utime - cpu.ru_utime) + (cpu_after.ru_stime - cpu.ru_stime)
    results_file = transform.target_dir() / "run_results.json"
    # Kept per build, for per-node timings.
    shutil.copy(results_file, settings.data_dir() / f"run_results_{label}.json")
    run_results = json.loads(results_file.read_text())
    results = run_results["results"]
    print(
        f"  dbt's own elapsed time {run_results['elapsed_time']:.1f}s "
        f"(the rest: starting dbt and parsing the project); "
        f"CPU time of the build process {cpu_seconds:.1f}s",
        file=sys.stderr,
    )
    slowest = sorted(results, key=lambda r: -r["execution_time"])[:6]
    print(
        "  slowest: "
        + ", ".join(f"{r['unique_id'].split('.')[-1]} {r['execution_time']:.1f}s" for r in slowest),
        file=sys.stderr,
    )
    return elapsed, run_results["elapsed_time"], cpu_seconds


def merge_fields_checksum() -> tuple:
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        return con.execute(
            "select count(*), sum(hash(contact_id, fields_hash)) from esp_merge_fields"
        ).fetchone()


def _state_copy() -> Path:
    """The warehouse as the incremental run finds it, kept to rerun that run."""
    return settings.data_dir() / "before_incremental.duckdb"


def _copy_to_disk(source: Path, target: Path) -> None:
    """Copy and fsync: on disk before the next build starts, else the build's first checkpoint
    (an fsync) pays for writing back the whole copy (~0.6-0.9 s at 1M contacts), which no
    real sync does."""
    shutil.copy(source, target)
    with open(target, "rb+") as copy:
        os.fsync(copy.fileno())


def save_state() -> None:
    with duckdb.connect(str(settings.warehouse_path())):
        pass  # closing checkpoints: the file alone holds everything
    _copy_to_disk(settings.warehouse_path(), _state_copy())


def restore_state() -> None:
    Path(f"{settings.warehouse_path()}.wal").unlink(missing_ok=True)
    _copy_to_disk(_state_copy(), settings.warehouse_path())


def incremental_runs(
    repeat: int, full_refreshes: int = 0, compact: bool = False
) -> tuple[tuple, tuple | None]:
    """`repeat` incremental builds, each from the same saved state, the first `full_refreshes`
    of them each followed by a full refresh of the same data (alternating, so the machine's
    slow and fast minutes fall on both kinds): the medians (seconds of the build, of dbt's own
    run, of CPU) of each kind. Every build must give the same esp_merge_fields, or exit 1.

    The incremental builds are the pipeline's hourly ones, which do not compact the warehouse
    (transform.build), unless `compact`: as the first build of each day."""
    runs, fulls, checksums = [], [], set()
    for i in range(repeat):
        if i:
            restore_state()
        runs.append(timed_build("incremental", compact=compact))
        checksums.add(merge_fields_checksum())
        print(f"incremental after 1% change {runs[-1][0]:8.1f}s  (dbt's own {runs[-1][1]:.1f}s)")
        if i < full_refreshes:
            fulls.append(timed_build("full", "--full-refresh"))
            checksums.add(merge_fields_checksum())
            print(
                f"full refresh, same data     {fulls[-1][0]:8.1f}s  (dbt's own {fulls[-1][1]:.1f}s)"
            )
    if len(checksums) != 1:
        print(f"the builds gave different esp_merge_fields: {checksums}")
        sys.exit(1)
    incremental = tuple(statistics.median(run[k] for run in runs) for k in range(3))
    full = tuple(statistics.median(run[k] for run in fulls) for k in range(3)) if fulls else None
    for label, kind in (("incremental", runs), ("full refresh", fulls)):
        if len(kind) > 1:
            wall, own = (statistics.median(run[k] for run in kind) for k in range(2))
            label = f"{label}, median of {len(kind)}"
            print(f"{label:28}{wall:8.1f}s  (dbt's own {own:.1f}s)")
    return incremental, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--data-dir", type=Path, help="default: a temporary folder")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="the new orders and events go to any contact (about 12%% of contacts change), "
        "not only to the changed 1%%",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="incremental builds from the same state (the ratio uses their median)",
    )
    parser.add_argument(
        "--full-refreshes",
        type=int,
        default=1,
        help="full refreshes of the same data, each right after one of the incremental builds "
        "(the ratio uses the medians of both kinds)",
    )
    parser.add_argument(
        "--incremental-only",
        action="store_true",
        help="rerun only the incremental build(s) from the state an earlier run of this script "
        "left in --data-dir (before_incremental.duckdb): to compare a change to the models "
        "on the same data",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="the incremental builds compact the warehouse, as the pipeline's first build of "
        "each day does (transform.compact_every_hours); by default they do not, as the builds "
        "in between, and one more incremental build that compacts is timed at the end",
    )
    args = parser.parse_args()
    if args.incremental_only and not args.data_dir:
        parser.error("--incremental-only needs the --data-dir of an earlier run")
    if not 1 <= args.full_refreshes <= args.repeat:
        parser.error("--full-refreshes must be between 1 and --repeat")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="presend-bench-"))
    os.environ["PRESEND_DATA_DIR"] = str(data_dir)
    os.environ.pop("PRESEND_WAREHOUSE", None)
    os.environ["PRESEND_TASK_POOL"] = settings.WAREHOUSE_POOL
    data_dir.mkdir(parents=True, exist_ok=True)

    from presend import transform

    transform.preload_dbt()
    transform.parse_for_forks({"as_of": AS_OF})  # the incremental and full-refresh builds'
    print(
        "dbt process per build: "
        + (
            "a fork of this process, which has warmed dbt up"
            if transform.forks_dbt()
            else "a new dbt executable"
        )
    )
    if args.incremental_only:
        if not _state_copy().exists():
            parser.error(f"{_state_copy()} does not exist: run without --incremental-only first")
        restore_state()
        incremental_runs(args.repeat, compact=args.compact)
        return
    t0 = time.perf_counter()
    generate(args.contacts, args.events)
    print(
        f"raw data: {args.contacts:,} contacts, {2 * args.contacts:,} orders, "
        f"{args.events:,} events, {PRODUCTS:,} products in {time.perf_counter() - t0:.1f}s"
    )
    first, _, _ = timed_build("first", "--full-refresh", as_of=FIRST_AS_OF)
    print(f"first full build            {first:8.1f}s")
    change_one_percent(args.contacts, args.events, spread=args.spread)
    save_state()
    (incremental, incremental_dbt, incremental_cpu), (full, full_dbt, full_cpu) = incremental_runs(
        args.repeat, args.full_refreshes, compact=args.compact
    )
    print(f"incremental / full refresh  {incremental / full:8.3f}  (goal <= 0.10)")
    print(f"  in dbt's own time         {incremental_dbt / full_dbt:8.3f}  (no dbt start-up)")
    # Less noisy than the wall clock on a shared machine, and what a warehouse bills for.
    print(
        f"  in CPU time               {incremental_cpu / full_cpu:8.3f}  "
        f"({incremental_cpu:.1f}s / {full_cpu:.1f}s of the build process)"
    )
    if not args.compact:
        checksum = merge_fields_checksum()  # every build's so far
        restore_state()
        compacting = timed_build("incremental_compacting", compact=True)[0]
        if merge_fields_checksum() != checksum:
            print("the compacting build gave a different esp_merge_fields")
            sys.exit(1)
        print(
            f"incremental that compacts   {compacting:8.1f}s  ({compacting / full:.3f} of a full "
            "refresh: the first build of each day)"
        )
    print("esp_merge_fields identical  True (every build)")


if __name__ == "__main__":
    main()
