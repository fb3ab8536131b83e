"""Every source stream, extracted from the real sandbox APIs on loopback and loaded into a real
DuckDB file, under each fault the vendors inflict; and after any sequence of runs and source
changes the raw tables equal the source's current state."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from datetime import UTC, datetime

import pytest
import requests

from presend import http, load, sources, warehouse
from presend.sandbox.server import CRM_TOKEN, EVENTS_TOKEN, SHOP_TOKEN, Sandbox
from presend.sources.extract import SourceConnection, extract

SIZES = {"contacts": 300, "orders": 600, "products": 60, "events": 3000}
# Small pages so that every stream spans several of them.
PAGE_SIZES = {"crm_contacts": 50, "shop_orders": 100, "shop_products": 25, "events": 500}
ALL = list(sources.STREAMS)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class Source:
    """The sandbox as the tests see it: per-stream URL, token, faults and current state."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.urls = {
            "crm_contacts": sb.crm_url,
            "shop_orders": sb.shop_url,
            "shop_products": sb.shop_url,
            "events": sb.events_url,
        }
        self.tokens = {
            "crm_contacts": CRM_TOKEN,
            "shop_orders": SHOP_TOKEN,
            "shop_products": SHOP_TOKEN,
            "events": EVENTS_TOKEN,
        }

    def stream(self, name: str, **changes) -> sources.Stream:
        return dataclasses.replace(sources.get(name), **{"page_size": PAGE_SIZES[name]} | changes)

    def conn(self, name: str) -> SourceConnection:
        return SourceConnection(self.urls[name], self.tokens[name])

    def arm(self, name: str, kind: str, **params) -> None:
        resp = requests.post(
            f"{self.urls[name]}/_sandbox/faults", json={"kind": kind, **params}, timeout=10
        )
        assert resp.status_code == 200, resp.text

    def fired(self, name: str) -> dict:
        return requests.get(f"{self.urls[name]}/_sandbox/faults", timeout=10).json()["fired"]

    def clear_faults(self) -> None:
        for url in set(self.urls.values()):
            requests.delete(f"{url}/_sandbox/faults", timeout=10).raise_for_status()

    def advance(self, share: float) -> None:
        for url in set(self.urls.values()):
            resp = requests.post(f"{url}/_sandbox/advance", json={"share": share}, timeout=60)
            resp.raise_for_status()

    def records(self, name: str) -> list[dict]:
        """Everything the API serves now, paged with the vendor's own paging."""
        url, token = self.urls[name], self.tokens[name]
        requests = http.session()  # retries 429s: the shop's call limit counts these calls too
        if name == "crm_contacts":
            out, after = [], "0"
            while after is not None:
                page = requests.post(
                    f"{url}/crm/v3/objects/contacts/search",
                    json={
                        "limit": 200,
                        "after": after,
                        "properties": list(sources.get(name).paginator.properties),
                    },
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                ).json()
                out += page["results"]
                after = page.get("paging", {}).get("next", {}).get("after")
            return out
        if name == "events":
            out, params = [], {"limit": 10_000}
            while True:
                page = requests.get(
                    f"{url}/api/v1/export/events",
                    params=params,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                ).json()
                out += page["data"]
                if not page["next_cursor"]:
                    return out
                params = {"cursor": page["next_cursor"], "limit": 10_000}
        resource = name.removeprefix("shop_")
        out = []
        resp = requests.get(
            f"{url}/admin/api/2024-10/{resource}.json",
            params={"limit": 250, "status": "any"},
            headers={"X-Shopify-Access-Token": token},
            timeout=30,
        )
        while True:
            out += resp.json()[resource]
            nxt = resp.links.get("next", {}).get("url")
            if not nxt:
                return out
            resp = requests.get(nxt, headers={"X-Shopify-Access-Token": token}, timeout=30)

    def state(self, name: str) -> dict[str, tuple]:
        """The source's current state in raw-table terms: id -> (cursor, payload columns)."""
        stream = sources.get(name)
        out: dict[str, tuple] = {}
        for rec in self.records(name):
            cursor = _utc(stream.cursor_of(rec))
            payload = tuple(
                _canon(rec) if c.name == "record" else _canon(rec.get(c.name))
                for c in stream.columns
            )
            out[str(rec["id"])] = (cursor, *payload)
        return out


def _utc(iso: str) -> str:
    ts = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds")


def _canon(value) -> str:
    if isinstance(value, str) and value[:1] in "{[":
        value = json.loads(value)
    return json.dumps(value, sort_keys=True)


def raw_state(name: str) -> dict[str, tuple]:
    """raw.<stream>: id -> (cursor, payload columns); fails on a duplicate id."""
    stream = sources.get(name)
    cols = ", ".join(c.name for c in stream.columns)
    with warehouse.connect(read_only=True) as con:
        rows = con.execute(f"select id, {stream.cursor}, {cols} from raw.{name}").fetchall()
    out: dict[str, tuple] = {}
    for rid, cursor, *payload in rows:
        assert rid not in out, f"duplicate id {rid} in raw.{name}"
        out[rid] = (cursor.isoformat(timespec="microseconds"), *(_canon(v) for v in payload))
    return out


def checksum(state: dict[str, tuple]) -> tuple[int, str]:
    """Row count and a checksum over every column, independent of row order."""
    lines = sorted(json.dumps([k, *v]) for k, v in state.items())
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def assert_raw_equals_source(src: Source, names: list[str] = ALL) -> None:
    for name in names:
        raw, truth = raw_state(name), src.state(name)
        assert raw.keys() == truth.keys(), name
        assert {k: v for k, v in raw.items() if truth[k] != v} == {}, name
        assert checksum(raw) == checksum(truth), name


def run(src: Source, names: list[str] = ALL, run_id: str = "run", **changes) -> dict:
    """Extract and load each stream from its committed cursor, as one ingest run does."""
    out = {}
    for name in names:
        stream = src.stream(name, **changes)
        extracted = extract(stream, src.conn(name), load.read_cursor(name), run_id)
        out[name] = (extracted, load.load_stream(stream, extracted.files))
    return out


def rejects(name: str) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return con.execute(
            "select landing_file, record, reason from raw.rejects where stream = ?", [name]
        ).fetchall()


@pytest.fixture
def src(tmp_path):
    with Sandbox(seed=21, esp_state=tmp_path / "esp.json", **SIZES) as sb:
        yield Source(sb)


# ---------------------------------------------------------------------------------------------
# runs converge on the source
# ---------------------------------------------------------------------------------------------


def test_first_run_loads_every_stream_exactly(data_dir, src):
    results = run(src)
    assert_raw_equals_source(src)
    for name, (extracted, loaded) in results.items():
        assert extracted.pages > 1, name
        assert loaded.rejected == 0
        assert loaded.files == extracted.pages
    with warehouse.connect(read_only=True) as con:
        state = dict(con.execute("select stream, cursor_value from raw.sync_state").fetchall())
    for name in ALL:
        assert state[name] == max(datetime.fromisoformat(v[0]) for v in raw_state(name).values())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_sequence_of_runs_and_source_changes_converges(data_dir, src, seed):
    rnd = random.Random(seed)
    for step in range(5):
        action = rnd.choice(["run", "advance", "run-some", "advance"])
        if action == "advance":
            src.advance(rnd.choice([0.01, 0.05, 0.2]))
        else:
            names = ALL if action == "run" else rnd.sample(ALL, 2)
            run(src, names, run_id=f"seq-{seed}-{step}")
    run(src, run_id=f"seq-{seed}-final")
    assert_raw_equals_source(src)


def test_an_incremental_run_fetches_only_from_the_cursor_with_the_lookback(data_dir, src):
    run(src)
    src.advance(0.05)
    second = run(src, run_id="second")
    for name in ("crm_contacts", "shop_orders", "shop_products"):
        extracted, _ = second[name]
        # Only the changed records, plus the ones sharing the cursor's value (inclusive).
        assert 0 < extracted.records < len(src.state(name)) / 4, name
    extracted, _ = second["events"]
    new = int(0.05 * SIZES["events"])
    assert new < extracted.records < new * 2  # an hour of lookback refetches a little
    assert_raw_equals_source(src)


def test_a_rerun_of_a_load_is_a_no_op(data_dir, src):
    results = run(src, ["shop_orders"])
    before = raw_state("shop_orders")
    again = load.load_stream("shop_orders", results["shop_orders"][0].files)
    assert (again.files, again.records) == (0, 0)
    assert raw_state("shop_orders") == before


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------


def test_429_with_shopifys_fractional_retry_after_is_waited_out(data_dir, src):
    src.arm("shop_orders", "status", status=429, retry_after="1.0", count=2)
    run(src, ["shop_orders"])
    assert src.fired("shop_orders") == {"status": 2}
    assert_raw_equals_source(src, ["shop_orders"])


@pytest.mark.parametrize("name", ["events", "crm_contacts", "shop_products"])
def test_a_5xx_burst_is_retried_and_nothing_is_lost(data_dir, src, name):
    src.arm(name, "status", status=503, count=2)
    src.arm(name, "status", status=500, count=1)
    run(src, [name])
    assert src.fired(name) == {"status": 3}
    assert_raw_equals_source(src, [name])


def test_a_5xx_burst_longer_than_the_retries_fails_loudly_and_the_rerun_converges(data_dir, src):
    run(src, ["events"])
    cursor = load.read_cursor("events")
    src.advance(0.05)
    src.arm("events", "status", status=502, count=50)
    with pytest.raises(requests.HTTPError, match="502"):
        run(src, ["events"], run_id="failing", retries=2)
    assert load.read_cursor("events") == cursor  # nothing committed for the failed run
    src.clear_faults()
    run(src, ["events"], run_id="rerun")
    assert_raw_equals_source(src, ["events"])


@pytest.mark.parametrize("name", ["crm_contacts", "shop_orders", "events"])
def test_a_response_slower_than_the_client_timeout_is_retried(data_dir, src, name):
    src.arm(name, "slow", seconds=3, count=1)
    run(src, [name], timeout=(5.0, 0.5))
    assert src.fired(name) == {"slow": 1}
    assert_raw_equals_source(src, [name])


@pytest.mark.parametrize("name", ALL)
def test_duplicates_across_pages_merge_into_one_row(data_dir, src, name):
    src.arm(name, "duplicate", count=2)
    _, loaded = run(src, [name])[name]
    assert src.fired(name) == {"duplicate": 2}
    assert loaded.records > len(src.state(name))  # the duplicates did land ...
    assert_raw_equals_source(src, [name])  # ... and raw holds each record once


@pytest.mark.parametrize("name", ALL)
def test_malformed_records_go_to_rejects_with_reason_and_landing_file(data_dir, src, name):
    src.arm(name, "malformed", count=1)
    extracted, loaded = run(src, [name])[name]
    assert loaded.rejected == 4
    got = rejects(name)
    assert len(got) == 4
    assert {f for f, _, _ in got} <= set(extracted.files)
    reasons = sorted(r for _, _, r in got)
    cursor = sources.get(name).cursor
    assert reasons == sorted(
        [
            "record is not a JSON object",
            "record is not a JSON object",
            "missing primary key id",
            f"{cursor} missing or not a timestamp",
        ]
    )
    assert any(json.loads(r) == "sandbox: malformed on purpose" for _, r, _ in got)
    assert_raw_equals_source(src, [name])  # every good record of the same pages loaded
    # Reloading the pages does not reject them twice.
    load.load_stream(name, extracted.files)
    assert len(rejects(name)) == 4


def test_records_with_the_wrong_types_are_rejected_with_the_reason(data_dir, src):
    from presend import landing

    good = src.records("shop_orders")[:3]
    bad_price = good[0] | {"id": 1, "total_price": "twelve"}
    bad_items = good[0] | {"id": 2, "line_items": "none"}
    object_id = good[0] | {"id": {"value": 3}}
    folder = landing.run_dir("shop_orders", "typed")
    page = json.dumps({"orders": [*good, bad_price, bad_items, object_id]}).encode()
    path = str(landing.write_page(folder, 1, page))
    result = load.load_stream("shop_orders", [path])
    assert (result.loaded, result.rejected) == (3, 3)
    assert sorted(r for _, _, r in rejects("shop_orders")) == [
        "line_items is not a list",
        "primary key id is not a string or an integer",
        "total_price missing or not a decimal",
    ]


@pytest.mark.parametrize(
    ("name", "sql"),
    [
        ("shop_orders", "record ->> 'presentment_currency' = 'EUR'"),
        ("events", "record ->> 'session_id' is not null"),
        ("crm_contacts", "properties ->> 'hs_analytics_source' = 'ORGANIC_SEARCH'"),
    ],
)
def test_a_field_the_vendor_adds_is_kept_and_the_run_succeeds(data_dir, src, name, sql):
    src.arm(name, "added_field", count=1000)  # from now on, every page carries it
    _, loaded = run(src, [name])[name]
    assert loaded.rejected == 0
    with warehouse.connect(read_only=True) as con:
        with_field = con.execute(f"select count(*) from raw.{name} where {sql}").fetchone()[0]
    assert with_field == len(src.state(name)) > 0


@pytest.mark.parametrize("name", ALL)
def test_records_updated_while_paging_are_not_lost(data_dir, src, name):
    # CRM search pages by offset: a record that changes moves to the end and the rest move up
    # one place, so a naive client skips one per change and its cursor then passes it by.
    src.arm(name, "update_while_paging", share=0.05, count=2)
    run(src, [name])
    assert src.fired(name) == {"update_while_paging": 2}
    run(src, [name], run_id="next")  # what changed after the last page: the next run's job
    assert_raw_equals_source(src, [name])


def test_records_updated_while_paging_are_caught_in_the_same_run(data_dir, src):
    src.arm("crm_contacts", "update_while_paging", share=0.05, count=2)
    run(src, ["crm_contacts"])
    # Nothing skipped: every contact is in raw, each at least as new as when paging started.
    assert raw_state("crm_contacts").keys() == src.state("crm_contacts").keys()
    run(src, ["crm_contacts"], run_id="next")
    assert_raw_equals_source(src, ["crm_contacts"])


def test_the_client_paces_itself_by_the_call_limit_header(data_dir, src):
    url = f"{src.urls['shop_orders']}/_sandbox/call_limit"
    requests.post(url, json={"bucket_size": 4, "leak_per_second": 5}, timeout=10)
    run(src, ["shop_orders"], page_size=25, leak_per_second=5)
    assert requests.get(url, timeout=10).json()["throttled"] == 0
    assert_raw_equals_source(src, ["shop_orders"])


def test_without_pacing_the_vendor_answers_429_and_retry_after_still_recovers(data_dir, src):
    url = f"{src.urls['shop_orders']}/_sandbox/call_limit"
    requests.post(url, json={"bucket_size": 4, "leak_per_second": 5}, timeout=10)
    run(src, ["shop_orders"], page_size=25, leak_per_second=None)
    assert requests.get(url, timeout=10).json()["throttled"] > 0
    assert_raw_equals_source(src, ["shop_orders"])
