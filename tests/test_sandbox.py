"""The sandbox servers behave like the vendor APIs the pipeline is written against.

Every call goes over HTTP to the real sandbox process on 127.0.0.1.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import requests

from presend.sandbox.crm import MAX_PAGE_SIZE, SEARCH_RESULT_CAP, make_contact
from presend.sandbox.esp import FIELD_MAX_LENGTH
from presend.sandbox.server import CRM_TOKEN, ESP_API_KEY, Sandbox

SEARCH = "/crm/v3/objects/contacts/search"
CONTACTS = "/v3/marketing/contacts"
FIELDS = "/v3/marketing/field_definitions"
CRM_AUTH = {"Authorization": f"Bearer {CRM_TOKEN}"}
ESP_AUTH = {"Authorization": f"Bearer {ESP_API_KEY}"}
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


def esp_get(esp_url: str, path: str, **kwargs) -> requests.Response:
    return requests.get(f"{esp_url}{path}", headers=ESP_AUTH, timeout=30, **kwargs)


def held(esp_url: str) -> dict[str, dict]:
    resp = requests.get(f"{esp_url}/_sandbox/contacts", timeout=30)
    resp.raise_for_status()
    return resp.json()


def put_contacts(esp_url: str, contacts: list[dict]) -> str:
    resp = requests.put(
        f"{esp_url}{CONTACTS}", json={"contacts": contacts}, headers=ESP_AUTH, timeout=30
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def poll(esp_url: str, job_id: str) -> dict:
    resp = esp_get(esp_url, f"{CONTACTS}/imports/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def run_job(esp_url: str, contacts: list[dict]) -> dict:
    """Upsert and poll the import job until it is no longer pending (bounded)."""
    job_id = put_contacts(esp_url, contacts)
    for _ in range(20):
        job = poll(esp_url, job_id)
        if job["status"] != "pending":
            return job
    pytest.fail(f"import job {job_id} still pending after 20 polls")


def create_field(esp_url: str, name: str, field_type: str = "Text") -> requests.Response:
    return requests.post(
        f"{esp_url}{FIELDS}",
        json={"name": name, "field_type": field_type},
        headers=ESP_AUTH,
        timeout=30,
    )


# ---------------------------------------------------------------------------------------------
# CRM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared():
    """One sandbox for this module's tests that leave the CRM's data as it is.

    ESP tests on it use their own emails and field names, so they do not see each other.
    """
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


# ---------------------------------------------------------------------------------------------
# ESP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": ESP_API_KEY}],
    ids=["no-header", "wrong-key", "no-bearer-prefix"],
)
def test_esp_without_the_api_key_is_401_and_changes_nothing(shared, headers):
    esp_url = shared.esp_url
    assert requests.get(f"{esp_url}{FIELDS}", headers=headers, timeout=30).status_code == 401
    email = "unauthorised@example.com"
    put = requests.put(
        f"{esp_url}{CONTACTS}", json={"contacts": [{"email": email}]}, headers=headers, timeout=30
    )
    assert put.status_code == 401
    assert "job_id" not in put.json()
    assert esp_get(esp_url, FIELDS).status_code == 200
    assert email not in held(esp_url)


def test_esp_field_definitions_create_by_name_and_refuse_a_duplicate(sandbox):
    created = create_field(sandbox.esp_url, "LOYALTY_TIER")
    assert created.status_code == 200
    field = created.json()
    assert field["name"] == "LOYALTY_TIER"

    listed = esp_get(sandbox.esp_url, FIELDS).json()
    assert listed["custom_fields"] == [field]
    reserved = [f["name"] for f in listed["reserved_fields"]]
    assert "first_name" in reserved

    duplicate = create_field(sandbox.esp_url, "LOYALTY_TIER")
    assert duplicate.status_code == 400
    assert "exists" in duplicate.json()["errors"][0]["message"]
    assert create_field(sandbox.esp_url, reserved[0]).status_code == 400
    assert esp_get(sandbox.esp_url, FIELDS).json()["custom_fields"] == [field]


def test_esp_upsert_is_an_async_job_pending_first_then_completed(shared):
    esp_url = shared.esp_url
    field_id = create_field(esp_url, "ASYNC_TIER").json()["id"]
    contacts = [
        {
            "email": f"  Async{i}@Example.com ",
            "first_name": f"Name{i}",
            "custom_fields": {field_id: f"tier{i}"},
        }
        for i in range(5)
    ]
    emails = [c["email"].strip().lower() for c in contacts]
    job_id = put_contacts(esp_url, contacts)

    first = poll(esp_url, job_id)
    assert first["id"] == job_id
    assert first["status"] == "pending"
    assert not set(emails) & held(esp_url).keys()  # nothing applied until the job has run

    done = poll(esp_url, job_id)
    assert done["status"] == "completed"
    assert done["results"]["requested_count"] == len(contacts)
    assert done["results"]["created_count"] == len(contacts)
    assert done["results"]["errored_count"] == 0

    holding = held(esp_url)
    for email, c in zip(emails, contacts, strict=True):
        assert holding[email]["first_name"] == c["first_name"]
        assert holding[email]["custom_fields"] == {"ASYNC_TIER": c["custom_fields"][field_id]}
        assert holding[email]["subscribed"] is True

    # Upserting again updates in place.
    again = run_job(esp_url, [contacts[0] | {"first_name": "Renamed"}])
    assert again["results"]["updated_count"] == 1
    assert again["results"]["created_count"] == 0
    assert held(esp_url)[emails[0]]["first_name"] == "Renamed"


def test_esp_unknown_import_job_is_404(shared):
    resp = esp_get(shared.esp_url, f"{CONTACTS}/imports/no-such-job")
    assert resp.status_code == 404


def test_esp_per_record_errors_are_listed_and_valid_records_still_apply(shared):
    esp_url = shared.esp_url
    limit = FIELD_MAX_LENGTH["first_name"]
    good = [
        {"email": "errors-ok@example.com", "first_name": "Ada"},
        {"email": "errors-edge@example.com", "first_name": "x" * limit},
    ]
    bad_email = {"email": "errors-not-an-email.example.com", "first_name": "Grace"}
    long_name = {"email": "errors-long@example.com", "first_name": "y" * (limit + 1)}
    job = run_job(esp_url, [good[0], bad_email, good[1], long_name])

    assert job["status"] == "completed"
    assert job["results"]["errored_count"] == 2
    assert job["results"]["created_count"] == len(good)
    errors = requests.get(f"{esp_url}{job['results']['errors_url']}", timeout=30).json()
    by_email = {e["email"]: e["message"] for e in errors}
    assert by_email.keys() == {bad_email["email"], long_name["email"]}
    assert "invalid email" in by_email[bad_email["email"]]
    assert "first_name" in by_email[long_name["email"]]
    assert str(limit) in by_email[long_name["email"]]

    holding = held(esp_url)
    for g in good:
        assert holding[g["email"]]["first_name"] == g["first_name"]
    assert bad_email["email"] not in holding
    assert long_name["email"] not in holding


def test_esp_upsert_never_changes_subscription_status(shared):
    esp_url = shared.esp_url
    email = "subscription@example.com"
    run_job(esp_url, [{"email": email, "first_name": "Grace"}])
    assert held(esp_url)[email]["subscribed"] is True

    resp = requests.post(f"{esp_url}/_sandbox/unsubscribe", json={"email": email}, timeout=30)
    assert resp.status_code == 200
    assert resp.json()["subscribed"] is False

    job = run_job(esp_url, [{"email": email.upper(), "first_name": "Hopper"}])
    assert job["results"]["updated_count"] == 1
    contact = held(esp_url)[email]
    assert contact["first_name"] == "Hopper"
    assert contact["subscribed"] is False


def test_esp_state_persists_across_a_restart(tmp_path):
    state = tmp_path / "esp-state.json"
    with Sandbox(contacts=10, esp_state=state) as first:
        field = create_field(first.esp_url, "LOYALTY_TIER").json()
        run_job(
            first.esp_url,
            [
                {
                    "email": "ada@example.com",
                    "first_name": "Ada",
                    "custom_fields": {field["id"]: "gold"},
                },
                {"email": "alan@example.com", "first_name": "Alan"},
            ],
        )
        requests.post(
            f"{first.esp_url}/_sandbox/unsubscribe", json={"email": "alan@example.com"}, timeout=30
        ).raise_for_status()
        before = held(first.esp_url)
    assert len(before) == 2

    with Sandbox(contacts=10, esp_state=state) as second:
        assert held(second.esp_url) == before
        assert esp_get(second.esp_url, FIELDS).json()["custom_fields"] == [field]
        # The field survives by name: creating it again is still a duplicate.
        assert create_field(second.esp_url, "LOYALTY_TIER").status_code == 400
