"""Ingest benchmark: presend's extract and load against the sandbox APIs at scale, DuckDB's own
`read_json` over the same landed files, and dlt's REST API source pulling the same sandbox into
a second DuckDB file.

    make bench-ingest                                  # 1M contacts, 10M events, 500k orders
    .venv/bin/python bench/bench_ingest.py --scale 0.01  # the same at 1%
    .venv/bin/python bench/bench_ingest.py --reuse-landing   # load stage again, same landed files

Every stage runs in a process of its own, as Airflow runs tasks, so each one's peak RSS is its
own. dlt cannot page HubSpot's search past its 10,000-result cap without a custom paginator, so
the comparison with dlt covers the shop and events streams; the CRM figures are presend's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from presend.sandbox.server import (  # noqa: E402
    CRM_TOKEN,
    EVENTS_TOKEN,
    SHOP_TOKEN,
    Sandbox,
)

COMPARED = ["shop_orders", "shop_products", "events"]  # what dlt pulls too
DLT_RESOURCE_DEFAULTS = {
    "primary_key": "id",
    "write_disposition": "merge",
    "parallelized": True,
    "max_table_nesting": 0,
}
GB = 1024**3


def _peak_rss() -> int:
    """This process's peak resident set size, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _env(data_dir: Path) -> None:
    os.environ["PRESEND_DATA_DIR"] = str(data_dir)
    os.environ["PRESEND_TASK_POOL"] = "warehouse"  # stands in for the Airflow pool
    os.environ.pop("PRESEND_WAREHOUSE", None)


def extract_one(data_dir: Path, name: str, url: str, token: str) -> dict:
    """One stream's extract (an Airflow extract task)."""
    _env(data_dir)
    from presend import load, sources
    from presend.sources.extract import SourceConnection, extract

    start = time.perf_counter()
    result = extract(sources.get(name), SourceConnection(url, token), load.read_cursor(name), "b")
    return {
        "stream": name,
        "files": result.files,
        "records": result.records,
        "seconds": time.perf_counter() - start,
        "rss": _peak_rss(),
    }


def load_all(data_dir: Path, extracted: dict[str, list[str]]) -> dict:
    """Every stream's load, one after the other (the `warehouse` pool has one slot)."""
    _env(data_dir)
    from presend import load

    out = {}
    for name, files in extracted.items():
        start = time.perf_counter()
        result = load.load_stream(name, files)
        out[name] = {"rows": result.loaded, "seconds": time.perf_counter() - start}
    out["rss"] = _peak_rss()
    return out


def read_json_baseline(data_dir: Path, extracted: dict[str, list[str]]) -> dict:
    """DuckDB's own read_json of the same landed files into a table, one row per record."""
    import duckdb

    from presend import sources

    out = {}
    con = duckdb.connect(str(data_dir / "read_json.duckdb"))
    for name, files in extracted.items():
        key = sources.get(name).records_key
        start = time.perf_counter()
        con.execute(
            f"create or replace table {name} as "
            f"select unnest({key}) as rec from read_json($files, format = 'auto')",
            {"files": files},
        )
        rows = con.execute(f"select count(*) from {name}").fetchone()[0]
        out[name] = {"rows": rows, "seconds": time.perf_counter() - start}
    con.close()
    out["rss"] = _peak_rss()
    return out


def dlt_pull(work: Path, shop_url: str, events_url: str) -> dict:
    """dlt's REST API source over the same sandbox, merged on the primary key into DuckDB.

    Tuned as dlt's performance guide advises, so the comparison is fair: the resources extract
    in parallel (presend extracts its streams in parallel too), intermediate files rotate so
    normalize runs a worker per core, and nested data stays JSON (`max_table_nesting` 0) as in
    presend's raw tables instead of being unnested into child tables. Normalize writes jsonl load
    files, which DuckDB copies in bulk: the destination's default, rows of INSERT statements,
    measured 3.5x slower end to end at 1% scale and, at 10%, 7 GB of RSS (`BENCH_DLT_FORMAT=
    insert_values` to see it).
    """
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    os.environ.setdefault("NORMALIZE__WORKERS", str(os.cpu_count() or 1))
    os.environ.setdefault("DATA_WRITER__FILE_MAX_ITEMS", "100000")
    import dlt
    from dlt.sources.rest_api import rest_api_source

    shop = rest_api_source(
        {
            "client": {
                "base_url": f"{shop_url}/admin/api/2024-10/",
                "auth": {
                    "type": "api_key",
                    "name": "X-Shopify-Access-Token",
                    "api_key": SHOP_TOKEN,
                    "location": "header",
                },
                "paginator": {"type": "header_link"},
            },
            "resource_defaults": DLT_RESOURCE_DEFAULTS,
            "resources": [
                {
                    "name": f"shop_{kind}",
                    "endpoint": {
                        "path": f"{kind}.json",
                        "params": {"limit": 250, "status": "any", "order": "updated_at asc"},
                        "data_selector": kind,
                    },
                }
                for kind in ("orders", "products")
            ],
        },
        name="shop",
    )
    events = rest_api_source(
        {
            "client": {
                "base_url": f"{events_url}/api/v1/",
                "auth": {"type": "bearer", "token": EVENTS_TOKEN},
                "paginator": {
                    "type": "cursor",
                    "cursor_path": "next_cursor",
                    "cursor_param": "cursor",
                },
            },
            "resource_defaults": DLT_RESOURCE_DEFAULTS,
            "resources": [
                {
                    "name": "events",
                    "endpoint": {
                        "path": "export/events",
                        "params": {"limit": 5000},
                        "data_selector": "data",
                    },
                }
            ],
        },
        name="events",
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_ingest",
        pipelines_dir=str(work / "dlt_pipelines"),
        destination=dlt.destinations.duckdb(str(work / "dlt.duckdb")),
        dataset_name="raw",
    )
    start = time.perf_counter()
    loader_file_format = os.environ.get("BENCH_DLT_FORMAT", "jsonl")
    pipeline.run([shop, events], loader_file_format=loader_file_format)
    seconds = time.perf_counter() - start
    steps = {
        s.step: (s.finished_at - s.started_at).total_seconds()
        for s in pipeline.last_trace.steps
        if s.finished_at and s.started_at
    }
    counts = pipeline.last_trace.last_normalize_info.row_counts
    return {
        "rows": sum(counts.get(n, 0) for n in COMPARED),
        "seconds": seconds,
        "steps": steps,
        "format": loader_file_format,
        "rss": _peak_rss(),
    }


def _line(stage: str, rows: int, seconds: float) -> None:
    rate = f"{rows / seconds:,.0f} rows/s" if seconds else "n/a"
    print(f"{stage:<44}{rows:>12,}{seconds:>10.1f}{rate:>22}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--orders", type=int, default=500_000)
    p.add_argument("--products", type=int, default=5_000)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size by this")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, default=ROOT / "data" / "bench-ingest")
    p.add_argument("--skip-dlt", action="store_true")
    p.add_argument(
        "--reuse-landing",
        action="store_true",
        help="reload the files landed by the previous run in --workdir (no sandbox, no extract,\n"
        "no dlt): re-measures the load stage and read_json only",
    )
    args = p.parse_args(argv)
    # Absolute, so the landed file paths in landed.json hold from any working directory.
    args.workdir = args.workdir.resolve()
    if args.reuse_landing:
        return reuse_landing(args.workdir)
    sizes = {
        k: max(1, int(getattr(args, k) * args.scale))
        for k in ("contacts", "events", "orders", "products")
    }
    if not args.skip_dlt:
        import importlib.util

        if importlib.util.find_spec("dlt") is None:
            # Checked first: a plain `uv sync` drops the bench group from the shared venv.
            p.error("dlt is not installed: `uv sync --frozen --group bench`, or --skip-dlt")
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    presend_dir = args.workdir / "presend"
    print(f"bench-ingest: {sizes}, work dir {args.workdir}", flush=True)

    start = time.perf_counter()
    with Sandbox(seed=args.seed, esp_state=args.workdir / "esp.json", **sizes) as sb:
        print(f"sandbox ready in {time.perf_counter() - start:.0f} s", flush=True)
        urls = {
            "crm_contacts": (sb.crm_url, CRM_TOKEN),
            "shop_orders": (sb.shop_url, SHOP_TOKEN),
            "shop_products": (sb.shop_url, SHOP_TOKEN),
            "events": (sb.events_url, EVENTS_TOKEN),
        }
        results = {}
        rounds: list[dict] = []  # the landed files, kept for --reuse-landing
        # Two rounds so the comparison with dlt is on the same streams: the streams dlt pulls,
        # then the CRM contacts. Extracts of a round run in parallel, loads one at a time.
        for round_streams in (COMPARED, ["crm_contacts"]):
            t0 = time.perf_counter()
            with ProcessPoolExecutor(max_workers=len(round_streams)) as pool:
                futures = [
                    pool.submit(extract_one, presend_dir, n, *urls[n]) for n in round_streams
                ]
                extracted = [f.result() for f in futures]
            extract_wall = time.perf_counter() - t0
            files = {e["stream"]: e["files"] for e in extracted}
            with ProcessPoolExecutor(max_workers=1) as pool:
                loaded = pool.submit(load_all, presend_dir, files).result()
                baseline = pool.submit(read_json_baseline, args.workdir, files).result()
            results[tuple(round_streams)] = (extracted, extract_wall, loaded, baseline)
            print(f"presend round {round_streams} done", flush=True)
            rounds.append({"extracted": extracted, "wall": extract_wall})
            (args.workdir / MANIFEST).write_text(json.dumps({"sizes": sizes, "rounds": rounds}))
        dlt = None
        if not args.skip_dlt:
            with ProcessPoolExecutor(max_workers=1) as pool:
                dlt = pool.submit(dlt_pull, args.workdir, sb.shop_url, sb.events_url).result()

    report(results, dlt)
    return 0


MANIFEST = "landed.json"


def reuse_landing(workdir: Path) -> int:
    """Load the files the previous run landed into a fresh warehouse, and read_json them."""
    manifest = json.loads((workdir / MANIFEST).read_text())
    print(f"bench-ingest --reuse-landing: {manifest['sizes']}, work dir {workdir}", flush=True)
    presend_dir = workdir / "presend"
    for f in [*presend_dir.glob("*.duckdb*"), *workdir.glob("read_json.duckdb*")]:
        f.unlink()
    results = {}
    for r in manifest["rounds"]:
        files = {e["stream"]: e["files"] for e in r["extracted"]}
        with ProcessPoolExecutor(max_workers=1) as pool:
            loaded = pool.submit(load_all, presend_dir, files).result()
            baseline = pool.submit(read_json_baseline, workdir, files).result()
        results[tuple(files)] = (r["extracted"], r["wall"], loaded, baseline)
    print("(extract figures are the previous run's)")
    report(results, None)
    return 0


def report(results: dict, dlt: dict | None) -> None:
    print()
    print(f"{'stage':<44}{'rows':>12}{'seconds':>10}{'rate':>22}")
    peak = 0
    compared_rows = compared_seconds = 0.0
    for streams, (extracted, wall, loaded, baseline) in results.items():
        label = "+".join(streams)
        rows = sum(e["records"] for e in extracted)
        _line(f"extract {label}", rows, wall)
        for e in extracted:
            _line(f"  {e['stream']}", e["records"], e["seconds"])
        load_rows = sum(loaded[n]["rows"] for n in streams)
        load_s = sum(loaded[n]["seconds"] for n in streams)
        _line(f"load (merge) {label}", load_rows, load_s)
        for n in streams:
            _line(f"  {n}", loaded[n]["rows"], loaded[n]["seconds"])
        base_rows = sum(baseline[n]["rows"] for n in streams)
        base_s = sum(baseline[n]["seconds"] for n in streams)
        _line(f"duckdb read_json {label}", base_rows, base_s)
        print(f"  load speed / read_json speed: {(load_rows / load_s) / (base_rows / base_s):.2f}")
        _line(f"extract+load {label}", load_rows, wall + load_s)
        peak = max([peak, loaded["rss"], *(e["rss"] for e in extracted)])
        if streams == tuple(COMPARED):
            compared_rows, compared_seconds = load_rows, wall + load_s
    print(f"presend peak RSS (largest process): {peak / GB:.2f} GB")
    if dlt:
        _line(f"dlt rest_api {'+'.join(COMPARED)}", dlt["rows"], dlt["seconds"])
        print(f"  dlt load files: {dlt['format']}")
        print("  dlt steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in dlt["steps"].items()))
        print(f"dlt peak RSS: {dlt['rss'] / GB:.2f} GB")
        ratio = (compared_rows / compared_seconds) / (dlt["rows"] / dlt["seconds"])
        print(f"presend / dlt extract+load rows/s on the same streams: {ratio:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
