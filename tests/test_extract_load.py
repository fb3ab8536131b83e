"""Extract CRM contacts into the landing zone and bulk-load them into raw.crm_contacts."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import requests

from presend import landing, load, settings, warehouse
from presend.sandbox.crm import EPOCH, MAX_PAGE_SIZE, SEARCH_RESULT_CAP, make_contact
from presend.sandbox.server import CRM_TOKEN, Sandbox
from presend.sources import crm
from presend.sources.crm import CrmConnection, extract_contacts

STREAM = crm.STREAM


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def served_contacts(crm_url: str) -> dict[str, dict]:
    """What the CRM serves now (below the 10,000 cap), as the extract asks for it, by id."""
    out: dict[str, dict] = {}
    after = "0"
    while True:
        resp = requests.post(
            f"{crm_url}/crm/v3/objects/contacts/search",
            json={"limit": MAX_PAGE_SIZE, "after": after, "properties": crm.PROPERTIES},
            headers={"Authorization": f"Bearer {CRM_TOKEN}"},
            timeout=30,
        )
        resp.raise_for_status()
        page = resp.json()
        for c in page["results"]:
            assert c["id"] not in out
            out[c["id"]] = c
        after = page.get("paging", {}).get("next", {}).get("after")
        if after is None:
            assert len(out) == page["total"]
            return out


def raw_contacts() -> dict[str, dict]:
    """raw.crm_contacts by id: lastmodifieddate (ISO, as the CRM writes it) and properties."""
    with warehouse.connect(read_only=True) as con:
        rows = con.execute(
            "select id, strftime(lastmodifieddate, '%Y-%m-%dT%H:%M:%S.%gZ'), properties "
            "from raw.crm_contacts"
        ).fetchall()
    out = {}
    for cid, modified, props in rows:
        assert cid not in out, f"duplicate id {cid} in raw.crm_contacts"
        out[cid] = {"lastmodifieddate": modified, "properties": json.loads(props)}
    return out


def assert_raw_equals(source: dict[str, dict]) -> None:
    raw = raw_contacts()
    assert raw.keys() == source.keys()
    for cid, c in source.items():
        assert raw[cid]["lastmodifieddate"] == c["properties"]["lastmodifieddate"], cid
        assert raw[cid]["properties"] == c["properties"], cid


def table(sql: str) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return con.execute(sql).fetchall()


def landed_records(files: list[str]) -> list[dict]:
    return [rec for f in files for rec in json.loads(Path(f).read_text())["results"]]


def write_pages(run_id: str, pages: list[list]) -> list[str]:
    """Landing files shaped like CRM search pages, for records the CRM would never send."""
    folder = landing.run_dir(STREAM, run_id)
    return [
        str(landing.write_page(folder, n, json.dumps({"total": len(r), "results": r}).encode()))
        for n, r in enumerate(pages, start=1)
    ]


def contact(i: int, modified: datetime, seed: int = 5) -> dict:
    """A contact record as the search API sends it."""
    return make_contact(seed, i, modified) | {"archived": False}


# ---------------------------------------------------------------------------------------------
# extract + load against the sandbox CRM
# ---------------------------------------------------------------------------------------------


def test_first_extract_lands_pages_and_load_mirrors_the_crm(data_dir, sandbox, crm_connection):
    source = served_contacts(sandbox.crm_url)

    extracted = extract_contacts(crm_connection, None, "first run")
    assert extracted.records == len(source)
    # Each page after the first starts one record early, to see records that moved meanwhile.
    pages = 1 + math.ceil((len(source) - crm.PAGE_SIZE) / (crm.PAGE_SIZE - 1))
    assert extracted.pages == len(extracted.files) == pages
    for f in extracted.files:
        path = Path(f)
        assert path.is_file()
        assert path.parent == Path(extracted.folder)
        assert path.is_relative_to(settings.landing_dir() / STREAM)
    landed = [r["id"] for r in landed_records(extracted.files)]
    assert set(landed) == set(source)
    assert len(landed) == len(source) + pages - 1

    result = load.load_contacts(STREAM, extracted.files)
    assert (result.files, result.records, result.loaded, result.rejected) == (
        len(extracted.files),
        len(landed),
        len(source),
        0,
    )
    assert_raw_equals(source)

    newest = max(c["properties"]["lastmodifieddate"] for c in source.values())
    assert result.cursor == newest
    assert load.read_cursor(STREAM) == newest

    log = dict(table("select landing_file, records from raw.load_log"))
    assert log == {f: len(json.loads(Path(f).read_text())["results"]) for f in extracted.files}
    assert table("select count(*) from raw.rejects") == [(0,)]


def test_incremental_run_fetches_from_the_cursor_inclusively_and_converges(
    data_dir, sandbox, crm_connection
):
    first = extract_contacts(crm_connection, None, "run-1")
    cursor = load.load_contacts(STREAM, first.files).cursor
    before = served_contacts(sandbox.crm_url)
    at_cursor = {i for i, c in before.items() if c["properties"]["lastmodifieddate"] == cursor}
    assert at_cursor, "the newest timestamp is shared by contacts the second run must refetch"

    resp = requests.post(f"{sandbox.crm_url}/_sandbox/advance", json={"share": 0.05}, timeout=30)
    resp.raise_for_status()
    changed = resp.json()["changed"]
    now = served_contacts(sandbox.crm_url)
    expected = {i for i, c in now.items() if c["properties"]["lastmodifieddate"] >= cursor}
    modified = {i for i in now if now[i] != before[i]}
    assert len(modified) == changed

    second = extract_contacts(crm_connection, cursor, "run-2")
    fetched = {r["id"] for r in landed_records(second.files)}
    assert fetched == expected
    assert modified <= set(fetched)
    assert set(fetched) & at_cursor  # inclusive: records sharing the cursor's timestamp
    assert len(fetched) < len(now)  # ... and nothing older

    result = load.load_contacts(STREAM, second.files)
    assert_raw_equals(now)  # every changed record updated, no duplicates
    newest = max(c["properties"]["lastmodifieddate"] for c in now.values())
    assert result.cursor == load.read_cursor(STREAM) == newest
    assert table("select count(*) from raw.load_log") == [(len(first.files) + len(second.files),)]


def test_reloading_the_same_landing_files_is_a_no_op(data_dir, sandbox, crm_connection):
    extracted = extract_contacts(crm_connection, None, "run")
    load.load_contacts(STREAM, extracted.files)

    def snapshot():
        return (
            table("select * from raw.crm_contacts order by id"),
            table("select * from raw.sync_state"),
            table("select * from raw.load_log order by landing_file"),
            table("select count(*) from raw.rejects"),
        )

    before = snapshot()
    again = load.load_contacts(STREAM, extracted.files)
    assert (again.files, again.records, again.loaded) == (0, 0, 0)
    assert snapshot() == before
    # A part of the run reloaded is as much of a no-op.
    load.load_contacts(STREAM, extracted.files[:2])
    assert snapshot() == before


def test_the_10000_result_cap_is_handled_and_every_contact_loads(data_dir):
    seed, size = 13, SEARCH_RESULT_CAP + 500
    with Sandbox(contacts=size, seed=seed) as sb:
        extracted = extract_contacts(CrmConnection(sb.crm_url, CRM_TOKEN), None, "capped")
        total = requests.post(
            f"{sb.crm_url}/crm/v3/objects/contacts/search",
            json={"limit": 1},
            headers={"Authorization": f"Bearer {CRM_TOKEN}"},
            timeout=30,
        ).json()["total"]
    assert total == size
    assert extracted.records >= total  # the restart refetches the newest timestamp

    result = load.load_contacts(STREAM, extracted.files)
    assert result.loaded == total
    raw = raw_contacts()
    assert raw.keys() == {str(i) for i in range(1, total + 1)}
    for cid, row in raw.items():
        # Each row is the seed's contact as of its modification time, with the fields asked for.
        truth = make_contact(seed, int(cid), _dt(row["lastmodifieddate"]))["properties"]
        assert row["properties"] == {k: truth[k] for k in [*crm.PROPERTIES, "hs_object_id"]}
    assert result.cursor == max(r["lastmodifieddate"] for r in raw.values())


# ---------------------------------------------------------------------------------------------
# load of hand-made landing files
# ---------------------------------------------------------------------------------------------


def test_malformed_records_are_rejected_and_good_records_in_the_same_page_load(data_dir):
    good = [contact(i, EPOCH + timedelta(minutes=i)) for i in range(1, 6)]
    no_id = contact(6, EPOCH)
    del no_id["id"]
    blank_id = contact(7, EPOCH) | {"id": "  "}
    not_object = "contact 8"
    array_record = [contact(9, EPOCH)]
    bad_date = contact(10, EPOCH)
    bad_date["properties"]["lastmodifieddate"] = "last tuesday"
    no_date = contact(11, EPOCH)
    del no_date["properties"]["lastmodifieddate"]
    bad_props = {"id": "12", "properties": "n/a"}
    page = [good[0], no_id, good[1], not_object, good[2], bad_date, array_record, good[3]]
    page += [blank_id, no_date, bad_props, good[4]]
    expected_reasons = {
        json.dumps(no_id, sort_keys=True): "id",
        json.dumps(blank_id, sort_keys=True): "id",
        json.dumps(not_object): "object",
        json.dumps(array_record, sort_keys=True): "object",
        json.dumps(bad_date, sort_keys=True): "lastmodifieddate",
        json.dumps(no_date, sort_keys=True): "lastmodifieddate",
        json.dumps(bad_props, sort_keys=True): "properties",
    }
    (path,) = write_pages("malformed", [page])

    result = load.load_contacts(STREAM, [path])
    assert (result.records, result.loaded, result.rejected) == (
        len(page),
        len(good),
        len(expected_reasons),
    )
    assert_raw_equals({c["id"]: c for c in good})
    assert result.cursor == max(c["properties"]["lastmodifieddate"] for c in good)

    rejects = table("select stream, landing_file, record, reason from raw.rejects")
    assert len(rejects) == len(expected_reasons)
    got = {}
    for stream, landing_file, record, reason in rejects:
        assert (stream, landing_file) == (STREAM, path)
        got[json.dumps(json.loads(record), sort_keys=True)] = reason
    assert got.keys() == expected_reasons.keys()
    for record, keyword in expected_reasons.items():
        assert keyword in got[record], (record, got[record])
    # The page itself counts as loaded, so the rejects are not duplicated on a rerun.
    load.load_contacts(STREAM, [path])
    assert table("select count(*) from raw.rejects") == [(len(expected_reasons),)]


def test_a_page_with_an_added_property_still_loads_and_keeps_it(data_dir):
    plain = [contact(i, EPOCH + timedelta(seconds=i)) for i in range(1, 4)]
    drifted = [contact(i, EPOCH + timedelta(seconds=i)) for i in range(4, 7)]
    for c in drifted:
        c["properties"]["favourite_colour"] = "teal"
    drifted[0]["associations"] = {"companies": []}  # a new key beside `properties` too
    files = write_pages("drift", [plain, drifted])

    result = load.load_contacts(STREAM, files)
    assert (result.loaded, result.rejected) == (len(plain) + len(drifted), 0)
    assert_raw_equals({c["id"]: c for c in plain + drifted})
    raw = raw_contacts()
    assert all(raw[c["id"]]["properties"]["favourite_colour"] == "teal" for c in drifted)
    assert all("favourite_colour" not in raw[c["id"]]["properties"] for c in plain)


def test_an_older_copy_of_a_record_does_not_overwrite_a_newer_one(data_dir):
    newer = contact(1, EPOCH + timedelta(hours=2))
    older = contact(1, EPOCH + timedelta(hours=1))
    older["properties"]["loyalty_tier"] = "stale"
    load.load_contacts(STREAM, write_pages("newer", [[newer]]))
    load.load_contacts(STREAM, write_pages("older", [[older]]))
    assert_raw_equals({"1": newer})
    assert load.read_cursor(STREAM) == newer["properties"]["lastmodifieddate"]


def test_a_rerun_extract_attempt_lands_new_files_that_load(data_dir, crm_connection, sandbox):
    first = crm.extract_contacts(crm_connection, None, "manual__rerun")
    load.load_contacts(STREAM, first.files)
    requests.post(f"{sandbox.crm_url}/_sandbox/advance", json={"share": 0.05}, timeout=10)
    # The same Airflow run id extracting again (a cleared task): its pages are new files.
    again = crm.extract_contacts(crm_connection, None, "manual__rerun")
    assert not set(again.files) & set(first.files)
    assert all(Path(f).exists() for f in first.files)
    assert load.load_contacts(STREAM, again.files).files == len(again.files)
    changed = {
        c["id"]: c["properties"]["lastmodifieddate"]
        for c in landed_records(again.files)
        if c["properties"]["lastmodifieddate"].startswith("2026-01-31")
    }
    rows = dict(
        table(
            "select id, strftime(lastmodifieddate, '%Y-%m-%dT%H:%M:%S.%gZ') from raw.crm_contacts"
        )
    )
    assert changed and all(rows[i] == ts for i, ts in changed.items())


def test_an_id_in_two_load_batches_is_counted_and_stored_once(data_dir, monkeypatch):
    first = [contact(i, EPOCH + timedelta(minutes=i)) for i in range(1, 4)]
    # Contact 2 again, changed, and contact 1 again, older: both in a later batch.
    newer = contact(2, EPOCH + timedelta(hours=5))
    newer["properties"]["loyalty_tier"] = "gold"
    older = contact(1, EPOCH - timedelta(hours=5))
    older["properties"]["loyalty_tier"] = "stale"
    second = [newer, older, contact(4, EPOCH + timedelta(minutes=4))]
    files = write_pages("batches", [first, second])
    monkeypatch.setattr(load, "BATCH_BYTES", 1)  # one page per transaction
    assert len(load._batches(files)) == 2

    result = load.load_contacts(STREAM, files)
    assert (result.records, result.loaded, result.rejected) == (6, 4, 0)
    assert_raw_equals({c["id"]: c for c in [first[0], newer, first[2], second[2]]})
    # A later call counts an id it loads again, even one an earlier call loaded.
    again = load.load_contacts(STREAM, write_pages("again", [[newer]]))
    assert (again.records, again.loaded) == (1, 1)
