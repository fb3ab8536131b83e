"""The sandbox ESP behaves like the vendor APIs the push is written against.

SendGrid Marketing Contacts and Klaviyo bulk profile import, statefully: async jobs, per-record
rejections, rate limits with the vendors' headers, injected 5xx. Every call goes over HTTP to
the real sandbox process on 127.0.0.1.
"""

from __future__ import annotations

import time

import pytest
import requests

from presend.sandbox.esp import (
    FIELD_MAX_LENGTH,
    KLAVIYO_ATTRIBUTE_MAX_LENGTH,
    KLAVIYO_IMPORT,
    SENDGRID_UPSERT,
)
from presend.sandbox.server import ESP_API_KEY, Sandbox

CONTACTS = "/v3/marketing/contacts"
FIELDS = "/v3/marketing/field_definitions"
JOBS = "/api/profile-bulk-import-jobs"
ESP_AUTH = {"Authorization": f"Bearer {ESP_API_KEY}"}
KLAVIYO_AUTH = {
    "Authorization": f"Klaviyo-API-Key {ESP_API_KEY}",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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


def faults(esp_url: str, **config) -> None:
    requests.post(f"{esp_url}/_sandbox/faults", json=config, timeout=30).raise_for_status()


def profiles(esp_url: str) -> dict[str, dict]:
    resp = requests.get(f"{esp_url}/_sandbox/klaviyo/profiles", timeout=30)
    resp.raise_for_status()
    return resp.json()


def import_profiles(esp_url: str, attrs: list[dict], meta: list[dict] | None = None):
    data = [
        {"type": "profile", "attributes": a} | ({"meta": m} if m else {})
        for a, m in zip(attrs, meta or [None] * len(attrs), strict=True)
    ]
    body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": data}}}}
    return requests.post(f"{esp_url}{JOBS}", json=body, headers=KLAVIYO_AUTH, timeout=30)


def run_import(esp_url: str, attrs: list[dict], meta: list[dict] | None = None) -> dict:
    resp = import_profiles(esp_url, attrs, meta)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["data"]["id"]
    for _ in range(20):
        job = requests.get(f"{esp_url}{JOBS}/{job_id}", headers=KLAVIYO_AUTH, timeout=30)
        assert job.status_code == 200, job.text
        if job.json()["data"]["attributes"]["status"] == "complete":
            return job.json()["data"]
    pytest.fail(f"import job {job_id} still queued after 20 polls")


@pytest.fixture(scope="module")
def shared():
    """One sandbox for the tests that use their own emails and field names."""
    with Sandbox(contacts=10, seed=11) as sb:
        yield sb


# ---------------------------------------------------------------------------------------------
# SendGrid
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

    # The vendor's words: "errored" = finished with some errors.
    assert job["status"] == "errored"
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


def test_esp_upsert_of_only_invalid_records_is_a_failed_job_with_its_errors(shared):
    job = run_job(shared.esp_url, [{"email": "failed-job-not-an-email"}])
    assert job["status"] == "failed"
    assert job["results"]["errored_count"] == 1
    errors = requests.get(f"{shared.esp_url}{job['results']['errors_url']}", timeout=30).json()
    assert errors == [{"email": "failed-job-not-an-email", "message": "invalid email"}]


# ---------------------------------------------------------------------------------------------
# Klaviyo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Klaviyo-API-Key wrong", "revision": "2026-07-15"},
        {"Authorization": f"Bearer {ESP_API_KEY}", "revision": "2026-07-15"},
        {"Authorization": f"Klaviyo-API-Key {ESP_API_KEY}"},  # no revision header
    ],
    ids=["no-header", "wrong-key", "sendgrid-style", "no-revision"],
)
def test_klaviyo_refuses_a_request_without_key_or_revision_and_changes_nothing(shared, headers):
    body = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {
                "profiles": {
                    "data": [{"type": "profile", "attributes": {"email": "refused@example.com"}}]
                }
            },
        }
    }
    resp = requests.post(f"{shared.esp_url}{JOBS}", json=body, headers=headers, timeout=30)
    assert resp.status_code in (400, 401)
    assert resp.json()["errors"][0]["detail"]
    assert "refused@example.com" not in profiles(shared.esp_url)


def test_klaviyo_import_is_queued_first_then_complete_and_merges_properties(shared):
    esp_url = shared.esp_url
    email = "merge@example.com"
    resp = import_profiles(esp_url, [{"email": email, "properties": {"TIER": "gold"}}])
    assert resp.status_code == 202
    job = resp.json()["data"]
    assert job["type"] == "profile-bulk-import-job"
    assert job["attributes"]["status"] == "queued"
    assert job["attributes"]["total_count"] == 1
    first = requests.get(f"{esp_url}{JOBS}/{job['id']}", headers=KLAVIYO_AUTH, timeout=30)
    assert first.json()["data"]["attributes"]["status"] == "queued"
    assert email not in profiles(esp_url)  # nothing applied until the job has run
    second = requests.get(f"{esp_url}{JOBS}/{job['id']}", headers=KLAVIYO_AUTH, timeout=30)
    assert second.json()["data"]["attributes"]["status"] == "complete"
    assert profiles(esp_url)[email]["properties"] == {"TIER": "gold"}

    done = run_import(esp_url, [{"email": email, "first_name": "Ada", "properties": {"N": "1"}}])
    assert done["attributes"]["completed_count"] == 1
    # Properties merge: a partial import keeps what it does not name.
    assert profiles(esp_url)[email]["properties"] == {"TIER": "gold", "N": "1"}
    assert profiles(esp_url)[email]["first_name"] == "Ada"

    run_import(esp_url, [{"email": email}], [{"patch_properties": {"unset": ["TIER"]}}])
    assert profiles(esp_url)[email]["properties"] == {"N": "1"}


def test_klaviyo_import_errors_are_paged_and_point_at_the_profile(shared):
    esp_url = shared.esp_url
    attrs = [{"email": f"paged{i}@example.com"} for i in range(3)]
    attrs += [{"email": f"paged-bad-{i}"} for i in range(5)]
    attrs += [{"email": "paged-long@example.com", "first_name": "x" * 256}]
    job = run_import(esp_url, attrs)
    assert (job["attributes"]["completed_count"], job["attributes"]["failed_count"]) == (3, 6)

    seen, url = [], f"{esp_url}{JOBS}/{job['id']}/import-errors?page[size]=4"
    while url:
        page = requests.get(url, headers=KLAVIYO_AUTH, timeout=30).json()
        assert len(page["data"]) <= 4
        seen += page["data"]
        nxt = page["links"].get("next")
        url = f"{esp_url}{nxt}" if nxt else None
    pointers = [e["attributes"]["source"]["pointer"] for e in seen]
    assert pointers == [f"/data/attributes/profiles/data/{i}" for i in range(3, 9)]
    assert all(e["attributes"]["code"] == "invalid" for e in seen)
    assert str(KLAVIYO_ATTRIBUTE_MAX_LENGTH) in seen[-1]["attributes"]["detail"]
    assert "paged-bad-0" not in profiles(esp_url)


def test_klaviyo_import_never_subscribes_nor_unsubscribes(shared):
    esp_url = shared.esp_url
    email = "consent@example.com"
    run_import(esp_url, [{"email": email, "first_name": "Grace"}])
    assert profiles(esp_url)[email]["subscribed"] is False
    requests.post(
        f"{esp_url}/_sandbox/subscribe", json={"vendor": "klaviyo", "email": email}, timeout=30
    ).raise_for_status()
    run_import(esp_url, [{"email": email, "first_name": "Hopper"}])
    assert profiles(esp_url)[email]["subscribed"] is True
    assert profiles(esp_url)[email]["first_name"] == "Hopper"


def test_klaviyo_refuses_more_than_10000_profiles(shared):
    resp = import_profiles(shared.esp_url, [{"email": f"m{i}@example.com"} for i in range(10_001)])
    assert resp.status_code == 400


# ---------------------------------------------------------------------------------------------
# rate limits and faults
# ---------------------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after_and_the_vendors_headers(sandbox):
    esp_url = sandbox.esp_url
    faults(esp_url, rate_limits={SENDGRID_UPSERT: [2, 60], KLAVIYO_IMPORT: [1, 60]})
    put = [put_contacts(esp_url, [{"email": f"rl{i}@example.com"}]) for i in range(2)]
    assert len(put) == 2
    third = requests.put(
        f"{esp_url}{CONTACTS}",
        json={"contacts": [{"email": "rl@x.com"}]},
        headers=ESP_AUTH,
        timeout=30,
    )
    assert third.status_code == 429
    assert third.headers["X-RateLimit-Limit"] == "2"
    assert third.headers["X-RateLimit-Remaining"] == "0"
    assert int(third.headers["X-RateLimit-Reset"]) > time.time() - 1
    assert 1 <= int(third.headers["Retry-After"]) <= 60

    ok = import_profiles(esp_url, [{"email": "rl-k@example.com"}])
    assert ok.status_code == 202
    assert ok.headers["RateLimit-Remaining"] == "0"
    limited = import_profiles(esp_url, [{"email": "rl-k2@example.com"}])
    assert limited.status_code == 429
    assert limited.headers["RateLimit-Limit"] == "1"
    assert 1 <= int(limited.headers["RateLimit-Reset"]) <= 60
    assert limited.headers["Retry-After"]
    # Unlimited routes are not throttled.
    assert esp_get(esp_url, FIELDS).status_code == 200


def test_injected_5xx_fail_the_next_requests_then_the_esp_answers_again(sandbox):
    faults(sandbox.esp_url, fail_next=2)
    assert esp_get(sandbox.esp_url, FIELDS).status_code == 503
    assert esp_get(sandbox.esp_url, FIELDS).status_code == 503
    assert esp_get(sandbox.esp_url, FIELDS).status_code == 200


def test_transient_rejections_name_the_record_and_pass_on_a_later_try(sandbox):
    esp_url = sandbox.esp_url
    faults(esp_url, transient_rejects={"busy@example.com": 1})
    job = run_job(esp_url, [{"email": "busy@example.com"}, {"email": "free@example.com"}])
    errors = requests.get(f"{esp_url}{job['results']['errors_url']}", timeout=30).json()
    assert [e["email"] for e in errors] == ["busy@example.com"]
    assert "retry" in errors[0]["message"]
    assert run_job(esp_url, [{"email": "busy@example.com"}])["status"] == "completed"
    assert "busy@example.com" in held(esp_url)
