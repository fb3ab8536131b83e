"""The load's two ways of reading a batch of landed pages: the fast path (`fast_landed_sql`, one
pass over each page) for batches whose records are all loadable, and the reference text path
(`landed_sql`) that every batch with a record it cannot load falls back to. Both must give the
same rows; the fast path must never accept a record the text path rejects."""

from __future__ import annotations

import json
from datetime import timedelta

import duckdb
import pytest

from presend import landing, load, sources, warehouse
from presend.sandbox.crm import EPOCH, make_contact
from presend.sandbox.faults import malformed_records

ALL = list(sources.STREAMS)


def _iso(minutes: int) -> str:
    return (EPOCH + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def good_records(name: str) -> list[dict]:
    """Loadable records of a stream, with the values that are easy to get subtly wrong."""
    odd = {
        "note": 'quote " backslash \\ tab \t unicode é ✓ \u2028 emoji 😀',
        "float": 1.50,
        "exp": 1e21,
        "big": 12345678901234567890123,
        "negative": -0.0,
        "nested": {"a": [1, 2.0, None, True, {"b": []}]},
        "empty": {},
    }
    if name == "crm_contacts":
        out = [
            make_contact(5, i, EPOCH + timedelta(minutes=i)) | {"archived": False} for i in (1, 2)
        ]
        out[0]["properties"] |= {"firstname": odd["note"], "extra": odd}
        out[1] |= {"archived": "true", "associations": odd}
        out.append(make_contact(5, 3, EPOCH) | {"archived": None})  # no archived flag known
        out.append(make_contact(5, 4, EPOCH))  # no archived key at all
        out[3]["properties"]["lastmodifieddate"] = "2026-01-01T03:04:05+02:00"
        return out
    cursor = sources.get(name).cursor_path[0]
    base = [
        {"id": "evt_1", "type": "product_viewed", "product_id": 5000000001, cursor: _iso(1)},
        {"id": 42, "type": "email_opened", "product_id": None, cursor: "2026-01-01T11:48:00-05:00"},
        {"id": "  padded  ", "type": "added_to_cart", cursor: "2026-01-02 10:00:00"},
        {"id": -7, "type": odd["note"], "product_id": -3, cursor: _iso(3), "extra": odd},
    ]
    if name == "events":
        return base
    extra = {
        "shop_orders": {"total_price": "12.50", "line_items": [{"price": 1.10, "q": 2}]},
        "shop_products": {"variants": [{"price": "9.99", "inventory_quantity": 0}]},
    }[name]
    return [{k: v for k, v in r.items() if k not in ("type", "product_id")} | extra for r in base]


def odd_records(name: str) -> list:
    """Records that are malformed one way or another, or only look it."""
    stream = sources.get(name)
    sample = good_records(name)[0]
    out = malformed_records("id", stream.cursor_path, sample)
    out += [None, 5, True, {}, sample | {"id": None}, sample | {"id": ""}, sample | {"id": 1.5}]
    out += [sample | {"id": {"v": 1}}, sample | {"id": [1]}, sample | {"id": 2**64}]
    if name == "crm_contacts":
        out += [sample | {"properties": None}, sample | {"properties": "n/a"}]
        out += [{k: v for k, v in sample.items() if k != "properties"}]
        out += [sample | {"archived": "maybe"}, sample | {"archived": {"a": 1}}]
    else:
        cursor = stream.cursor_path[0]
        out += [sample | {cursor: None}, sample | {cursor: 20260101}, sample | {cursor: "infinity"}]
    for field in stream.fields:
        out += [sample | {field: None}, sample | {field: {"x": 1}}, sample | {field: "1"}]
        out += [sample | {field: 1}, {k: v for k, v in sample.items() if k != field}]
    return out


def write_page(name: str, run_id: str, n: int, records: list, pretty: bool = False) -> str:
    key = sources.get(name).records_key
    body = json.dumps({"total": len(records), key: records}, indent=2 if pretty else None)
    return str(landing.write_page(landing.run_dir(name, run_id), n, body.encode()))


def build(sql: str, files: list[str]) -> list[tuple]:
    with duckdb.connect() as con:
        con.execute("set TimeZone = 'UTC'")
        load.ensure_schema(con)
        con.execute(*load._pages(sql, files, 2))
        return con.execute("select * from landed order by all").fetchall()


def columns(sql: str, files: list[str]) -> list[str]:
    with duckdb.connect() as con:
        con.execute("set TimeZone = 'UTC'")
        con.execute(*load._pages(sql, files, 2))
        return [r[0] for r in con.execute("describe landed").fetchall()]


@pytest.mark.parametrize("name", ALL)
def test_both_paths_read_clean_pages_into_the_same_rows(data_dir, name):
    stream = sources.get(name)
    records = good_records(name)
    files = [write_page(name, "clean", 1, records), write_page(name, "clean", 2, records, True)]
    # A duplicate key: both paths take the first one.
    raw = json.dumps({stream.records_key: [records[0]]})
    raw = raw.replace('{"id": ', '{"id": "dup-first", "id": ', 1)
    files.append(str(landing.write_page(landing.run_dir(name, "clean"), 3, raw.encode())))

    text = build(load.landed_sql(stream), files)
    fast = build(load.fast_landed_sql(stream), files)
    assert columns(load.landed_sql(stream), files) == columns(load.fast_landed_sql(stream), files)
    assert fast == text
    reason = columns(load.landed_sql(stream), files).index("reject_reason")
    assert len(text) == 2 * len(records) + 1 and all(r[reason] is None for r in text)
    assert "dup-first" in {r[2] for r in text}


@pytest.mark.parametrize("name", ALL)
def test_the_fast_path_rejects_every_record_the_text_path_rejects(data_dir, name):
    """Record by record: what the text path rejects the fast path rejects too (the batch then
    falls back to the text path), and what it loads the fast path reads the same."""
    stream = sources.get(name)
    cols = columns(load.landed_sql(stream), [write_page(name, "probe", 1, good_records(name))])
    reason = cols.index("reject_reason")
    rejected = 0
    for n, record in enumerate(odd_records(name), start=1):
        files = [write_page(name, "odd", n, [record])]
        (text,) = build(load.landed_sql(stream), files)
        (fast,) = build(load.fast_landed_sql(stream), files)
        if text[reason] is None:
            assert fast == text, record
        else:
            rejected += 1
            assert fast[reason] is not None, record
    assert rejected >= 10


class Paths:
    """The path each batch of a load took."""

    def __init__(self, monkeypatch) -> None:
        self.taken: list[str] = []
        build_landed = load._build_landed

        def spy(*args):
            self.taken.append(build_landed(*args))
            return self.taken[-1]

        monkeypatch.setattr(load, "_build_landed", spy)


def raw_rows(name: str) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return con.execute(f"select * exclude (_loaded_at) from raw.{name} order by id").fetchall()


def state() -> tuple:
    with warehouse.connect(read_only=True) as con:
        return (
            con.execute("select stream, cursor_value from raw.sync_state order by all").fetchall(),
            con.execute(
                "select landing_file, stream, records from raw.load_log order by 1"
            ).fetchall(),
            con.execute(
                "select stream, landing_file, record, reason from raw.rejects order by all"
            ).fetchall(),
        )


@pytest.mark.parametrize("name", ALL)
def test_a_load_gives_the_same_raw_rows_by_either_path(data_dir, tmp_path, monkeypatch, name):
    records = good_records(name)
    newer = json.loads(json.dumps(records[0]))  # the first record again, changed, later
    cursor = sources.get(name).cursor_path
    target = newer
    for key in cursor[:-1]:
        target = target[key]
    target[cursor[-1]] = "2027-01-01T00:00:00.000Z"
    files = [write_page(name, "run", 1, records), write_page(name, "run", 2, [*records, newer])]
    more = [write_page(name, "run2", 1, [*records[1:], newer])]  # present ids: the update path

    got = {}
    for fast in (False, True):
        monkeypatch.setattr(load, "FAST_PATH", fast)
        monkeypatch.setenv("PRESEND_DATA_DIR", str(tmp_path / f"fast-{fast}"))
        paths = Paths(monkeypatch)
        first = load.load_stream(name, files)
        second = load.load_stream(name, more)
        assert paths.taken == ["fast" if fast else "text"] * 2
        got[fast] = (first, second, raw_rows(name), state())
    assert got[True] == got[False]
    first, second, rows, _ = got[True]
    assert (first.records, first.loaded, first.rejected) == (2 * len(records) + 1, len(records), 0)
    assert (second.records, second.loaded) == (len(records), len(records))
    assert len(rows) == len(records)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch_bytes", [1, 256 * 1024 * 1024])
def test_a_batch_with_a_malformed_record_falls_back_and_rejects_it(
    data_dir, monkeypatch, name, batch_bytes
):
    """The clean page's records and the malformed page's good records load; the malformed ones
    go to raw.rejects with their reason and landing file, exactly as the text path alone does."""
    monkeypatch.setattr(load, "BATCH_BYTES", batch_bytes)
    records = good_records(name)
    bad = malformed_records("id", sources.get(name).cursor_path, records[0] | {"id": "other"})
    clean = write_page(name, "mixed", 1, records[:2])
    mixed = write_page(name, "mixed", 2, [bad[0], records[2], bad[1], bad[2], records[3], bad[3]])
    paths = Paths(monkeypatch)
    result = load.load_stream(name, [clean, mixed])
    assert paths.taken == (["fast", "text"] if batch_bytes == 1 else ["text"])
    assert (result.records, result.loaded, result.rejected) == (8, 4, 4)
    assert len(raw_rows(name)) == 4
    _, log, rejects = state()
    assert sorted(log) == sorted([(clean, name, 2), (mixed, name, 6)])
    cursor = sources.get(name).cursor
    assert sorted((f, reason) for _, f, _, reason in rejects) == sorted(
        [
            (mixed, "missing primary key id"),
            (mixed, "record is not a JSON object"),
            (mixed, "record is not a JSON object"),
            (mixed, f"{cursor} missing or not a timestamp"),
        ]
    )
    fast_rows, fast_state = raw_rows(name), state()

    # The text path alone, in a fresh warehouse, gives the same rows and rejects.
    monkeypatch.setenv("PRESEND_DATA_DIR", str(data_dir.parent / "text-only"))
    monkeypatch.setattr(load, "FAST_PATH", False)
    load.load_stream(name, [clean, mixed])
    assert raw_rows(name) == fast_rows
    assert state() == fast_state
