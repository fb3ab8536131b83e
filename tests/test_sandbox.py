"""The sandbox servers behave like the vendor APIs the pipeline is written against.

Every call goes over HTTP to the real sandbox process on 127.0.0.1.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import requests

from presend.sandbox.crm import MAX_PAGE_SIZE, SEARCH_RESULT_CAP, make_contact
from presend.sandbox.server import CRM_TOKEN, Sandbox

SEARCH = "/crm/v3/objects/contacts/search"
CRM_AUTH = {"Authorization": f"Bearer {CRM_TOKEN}"}
SHARED_SEED = 11


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _millis(iso: str) -> str:
    ts = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return str((ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1))


def search(crm_url: str, body: dict, headers: dict | None = CRM_AUTH) -> requests.Response:
    return requests.post(f"{crm_url}{SEARCH}", json=body, headers=headers, timeout=30)


def gte(iso_or_millis: str) -> list[dict]:
    value = iso_or_millis if iso_or_millis.isdigit() else _millis(iso_or_millis)
    return [{"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": value}]}]


def page_all(crm_url: str, limit: int = MAX_PAGE_SIZE, since: str | None = None) -> list[dict]:
    """Every contact the search serves (below the result cap), following `after`."""
    out, after = [], "0"
    while True:
        body = {"limit": limit, "after": after}
        if since:
            body["filterGroups"] = gte(since)
        resp = search(crm_url, body)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["results"]) <= limit
        out += page["results"]
        nxt = page.get("paging", {}).get("next", {}).get("after")
        if nxt is None:
            assert len(out) == page["total"]
            return out
        after = nxt


def sort_key(contact: dict) -> tuple[str, int]:
    return contact["properties"]["lastmodifieddate"], int(contact["id"])


# ---------------------------------------------------------------------------------------------
# CRM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared():
    """One sandbox for this module's tests that leave the CRM's data as it is."""
    with Sandbox(contacts=1000, seed=SHARED_SEED) as sb:
        yield sb


@pytest.fixture(scope="module")
def crm_url(shared):
    return shared.crm_url


@pytest.fixture(scope="module")
def served(crm_url) -> list[dict]:
    return page_all(crm_url)


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong-token"}, {"Authorization": CRM_TOKEN}],
    ids=["no-header", "wrong-token", "no-bearer-prefix"],
)
def test_crm_search_without_the_bearer_token_is_401(crm_url, headers):
    resp = search(crm_url, {"limit": 10}, headers=headers)
    assert resp.status_code == 401
    assert "results" not in resp.json()


def test_crm_search_with_the_bearer_token_answers(crm_url):
    resp = search(crm_url, {"limit": 10})
    assert resp.status_code == 200
    assert len(resp.json()["results"]) == 10


@pytest.mark.parametrize("limit", [MAX_PAGE_SIZE + 1, 1000, 0])
def test_crm_limit_outside_1_to_200_is_400(crm_url, limit):
    resp = search(crm_url, {"limit": limit})
    assert resp.status_code == 400
    assert "limit" in resp.json()["message"]


def test_crm_limit_of_200_is_allowed(crm_url):
    resp = search(crm_url, {"limit": MAX_PAGE_SIZE})
    assert resp.status_code == 200
    assert len(resp.json()["results"]) == MAX_PAGE_SIZE


@pytest.mark.parametrize("limit", [MAX_PAGE_SIZE, 137])
def test_crm_paging_returns_every_contact_once_in_modified_then_id_order(crm_url, served, limit):
    contacts = page_all(crm_url, limit=limit) if limit != MAX_PAGE_SIZE else served
    ids = [c["id"] for c in contacts]
    assert len(ids) == len(set(ids)) == 1000
    assert set(ids) == {str(i) for i in range(1, 1001)}
    assert [sort_key(c) for c in contacts] == sorted(sort_key(c) for c in contacts)
    # The data behind each id is the seed's deterministic contact as of its modification.
    for c in contacts:
        modified = datetime.fromisoformat(
            c["properties"]["lastmodifieddate"].replace("Z", "+00:00")
        )
        assert c["properties"] == make_contact(SHARED_SEED, int(c["id"]), modified)["properties"]


def test_crm_search_returns_only_the_requested_properties(crm_url):
    resp = search(crm_url, {"limit": 5, "properties": ["email"]})
    for c in resp.json()["results"]:
        assert set(c["properties"]) == {"email", "hs_object_id", "lastmodifieddate"}


def test_crm_gte_filter_on_epoch_millis_is_inclusive(crm_url, served):
    stamps = Counter(c["properties"]["lastmodifieddate"] for c in served)
    # A timestamp in the middle that several contacts share: the interesting boundary.
    shared = sorted(t for t, n in stamps.items() if n > 1)
    assert shared, "the sandbox must have contacts sharing a lastmodifieddate"
    boundary = shared[len(shared) // 2]
    expected = [c for c in served if c["properties"]["lastmodifieddate"] >= boundary]

    got = page_all(crm_url, since=_millis(boundary))
    assert [c["id"] for c in got] == [c["id"] for c in expected]
    at_boundary = [c for c in got if c["properties"]["lastmodifieddate"] == boundary]
    assert len(at_boundary) == stamps[boundary]

    # One millisecond later excludes exactly the contacts at the boundary.
    later = str(int(_millis(boundary)) + 1)
    assert len(page_all(crm_url, since=later)) == len(expected) - stamps[boundary]


def test_crm_paging_past_10000_results_is_400():
    with Sandbox(contacts=SEARCH_RESULT_CAP + 500, seed=3) as sb:
        near = search(sb.crm_url, {"limit": MAX_PAGE_SIZE, "after": str(SEARCH_RESULT_CAP - 100)})
        assert near.status_code == 200
        page = near.json()
        assert page["total"] == SEARCH_RESULT_CAP + 500
        # A page never crosses the cap; the next cursor points at it.
        assert len(page["results"]) == 100
        assert page["paging"]["next"]["after"] == str(SEARCH_RESULT_CAP)

        past = search(sb.crm_url, {"limit": 10, "after": str(SEARCH_RESULT_CAP)})
        assert past.status_code == 400
        assert str(SEARCH_RESULT_CAP) in past.json()["message"]

        # Narrowing the query by lastmodifieddate reaches the rest.
        newest = page["results"][-1]["properties"]["lastmodifieddate"]
        rest = search(sb.crm_url, {"limit": 10, "filterGroups": gte(newest)})
        assert rest.status_code == 200
        assert rest.json()["total"] > 500


def test_crm_advance_modifies_the_share_and_stamps_them_with_the_new_clock(sandbox):
    before = {c["id"]: c for c in page_all(sandbox.crm_url)}
    newest_before = max(c["properties"]["lastmodifieddate"] for c in before.values())

    resp = requests.post(f"{sandbox.crm_url}/_sandbox/advance", json={"share": 0.05}, timeout=30)
    assert resp.status_code == 200
    changed, clock = resp.json()["changed"], resp.json()["clock"]
    assert changed == round(0.05 * len(before))
    assert clock > newest_before

    after = {c["id"]: c for c in page_all(sandbox.crm_url)}
    assert after.keys() == before.keys()
    moved = {i for i in after if after[i] != before[i]}
    assert len(moved) == changed
    for i in moved:
        assert after[i]["properties"]["lastmodifieddate"] == clock
        assert after[i]["properties"]["email"] == before[i]["properties"]["email"]
    # The moved contacts are exactly what an incremental query from the new clock sees.
    assert {c["id"] for c in page_all(sandbox.crm_url, since=clock)} == moved


def test_crm_inject_patches_and_adds_contacts_that_the_next_incremental_query_brings(sandbox):
    before = {c["id"]: c for c in page_all(sandbox.crm_url)}
    resp = requests.post(
        f"{sandbox.crm_url}/_sandbox/inject",
        json={
            "contacts": [
                {"id": "5", "properties": {"email": "not-an-email"}},
                {"copy_of": "7", "properties": {"firstname": "Twin"}},
            ]
        },
        timeout=30,
    )
    assert resp.status_code == 200
    (patched, added), clock = resp.json()["written"], resp.json()["clock"]
    assert patched == "5" and added == str(len(before) + 1)
    assert clock > max(c["properties"]["lastmodifieddate"] for c in before.values())
    brought = {c["id"]: c["properties"] for c in page_all(sandbox.crm_url, since=clock)}
    assert brought.keys() == {"5", added}
    assert brought["5"]["email"] == "not-an-email"
    assert brought["5"]["firstname"] == before["5"]["properties"]["firstname"]
    assert brought[added]["email"] == before["7"]["properties"]["email"]
    assert brought[added]["firstname"] == "Twin"
    assert brought[added]["hs_object_id"] == added


def test_crm_contacts_changed_while_paging_shift_the_offsets_as_hubspot_does(sandbox):
    # The sandbox reproduces what makes naive offset paging lose records: a contact changed
    # between two pages moves to the end, the rest move up, and one contact is never served.
    resp = requests.post(
        f"{sandbox.crm_url}/_sandbox/faults",
        json={"kind": "update_while_paging", "share": 0.05, "count": 1},
        timeout=10,
    )
    assert resp.status_code == 200
    naive = page_all(sandbox.crm_url, limit=100)
    served_once = {c["id"] for c in naive}
    now = {c["id"] for c in page_all(sandbox.crm_url, limit=100)}
    assert now - served_once, "paging by offset while records change skips some"


def test_a_sandbox_api_that_cannot_start_fails_the_whole_sandbox_at_once(tmp_path):
    """Each API runs in a process of its own: one that dies while starting (here the ESP, on a
    corrupt state file) stops the others and the start fails, instead of a half sandbox."""
    import subprocess

    state = tmp_path / "esp.json"
    state.write_text("not json")
    sb = Sandbox(contacts=10, esp_state=state)
    with pytest.raises(RuntimeError, match="sandbox exited with code 1"):
        sb.start(timeout=30)
    left = subprocess.run(["pgrep", "-f", f"--esp-state {state}"], capture_output=True)
    assert left.stdout == b"", "an API process outlived the failed sandbox"


def test_the_sandbox_stops_when_the_process_that_started_it_is_killed(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    urls = tmp_path / "urls.txt"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, time\n"
            "from presend.sandbox.server import Sandbox\n"
            "sb = Sandbox(contacts=10).start()\n"
            f"pathlib.Path({str(urls)!r}).write_text(sb.crm_url)\n"
            "time.sleep(600)\n",
        ],
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    deadline = time.monotonic() + 60
    while not urls.exists():
        assert time.monotonic() < deadline and starter.poll() is None
        time.sleep(0.1)
    port = int(urls.read_text().rsplit(":", 1)[1])
    starter.send_signal(signal.SIGKILL)  # no cleanup code runs in the starter
    starter.wait()
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, "the sandbox outlived the process that started it"
        time.sleep(0.2)
