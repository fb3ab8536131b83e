"""Contract tests: every request each ESP adapter sends is valid against the vendor's OpenAPI.

The adapters run real pushes against the sandbox ESP (new contacts, partial changes, clears,
rejected records, paged import errors); every request they make is recorded on the wire and
validated with openapi-core against the vendor's published spec in `<repo>/../shared/specs`.
"""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest
from openapi_core.validation.request.exceptions import InvalidRequestBody

from presend import push, warehouse
from presend.esp import make_adapter
from presend.sandbox.server import ESP_API_KEY

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO.parent / "shared" / "specs"
SPEC_FILES = {
    "sendgrid": ["sendgrid/tsg_mc_contacts_v3.json", "sendgrid/tsg_mc_custom_fields_v3.json"],
    "klaviyo": ["klaviyo/profiles.json"],
}
# Where a push may go besides the spec'd API: SendGrid's job results name an `errors_url`
# (a file the vendor serves outside the REST API); the sandbox serves it under /_sandbox.
OUTSIDE_THE_API = ("/_sandbox/",)


class Spec:
    """One vendor's OpenAPI documents, validating requests sent to any base URL."""

    def __init__(self, vendor: str) -> None:
        self.apis = []
        for name in SPEC_FILES[vendor]:
            path = SPECS / name
            if not path.exists():
                pytest.fail(
                    f"vendor spec {path} is missing: the contract tests need the shared specs "
                    f"checked out beside the repository (<repo>/../shared/specs)",
                    pytrace=False,
                )
            doc = json.loads(path.read_text())
            self.apis.append((set(doc["paths"]), doc["servers"][0]["url"], OpenAPI.from_dict(doc)))

    def validate(self, prepared: requests.PreparedRequest) -> None:
        """Raise unless the request matches an operation of the spec, body included."""
        path = urlsplit(prepared.url).path
        for paths, server, api in self.apis:
            if any(_matches(template, path) for template in paths):
                req = prepared.copy()
                parts = urlsplit(prepared.url)
                base = urlsplit(server)
                req.url = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))
                api.validate_request(RequestsOpenAPIRequest(req))
                return
        raise AssertionError(f"{prepared.method} {path} is not an operation of the spec")


def _matches(template: str, path: str) -> bool:
    t, p = template.strip("/").split("/"), path.strip("/").split("/")
    return len(t) == len(p) and all(a == b or a.startswith("{") for a, b in zip(t, p, strict=True))


@pytest.fixture(scope="module", params=["sendgrid", "klaviyo"])
def vendor(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def spec(vendor) -> Spec:
    return Spec(vendor)


def write_merge_fields(rows: list[dict]) -> None:
    """esp_merge_fields as dbt builds it, with typed columns (ints, decimals, dates)."""
    with warehouse.connect() as con:
        con.execute(
            "create or replace table esp_merge_fields (contact_id varchar primary key, "
            '"EMAIL" varchar, "FIRST_NAME" varchar, "LOYALTY_TIER" varchar, '
            '"ORDER_COUNT" integer, "LIFETIME_VALUE" decimal(12, 2), "LAST_ORDER_DATE" date, '
            "fields_hash varchar)"
        )
        con.executemany(
            "insert into esp_merge_fields values (?, ?, ?, ?, ?, ?, ?, md5(?))",
            [
                [
                    r["contact_id"],
                    r["EMAIL"],
                    r["FIRST_NAME"],
                    r["LOYALTY_TIER"],
                    r["ORDER_COUNT"],
                    r["LIFETIME_VALUE"],
                    r["LAST_ORDER_DATE"],
                    json.dumps(r, default=str),
                ]
                for r in rows
            ],
        )


def make_row(i: int, **values) -> dict:
    return {
        "contact_id": f"{i:05d}",
        "EMAIL": f"contract{i}@example.com",
        "FIRST_NAME": f"Name{i}",
        "LOYALTY_TIER": "gold",
        "ORDER_COUNT": i,
        "LIFETIME_VALUE": Decimal(f"{i}.50"),
        "LAST_ORDER_DATE": date(2026, 1, 1 + i % 28),
    } | values


def test_every_request_of_every_kind_of_push_matches_the_vendor_spec(
    vendor, spec, data_dir, sandbox
):
    adapter = make_adapter(vendor, sandbox.esp_url, ESP_API_KEY, poll_interval=0.01)
    sent: list[requests.PreparedRequest] = []
    adapter.http.hooks["response"].append(lambda resp, *a, **k: sent.append(resp.request))

    # New contacts in full, and more rejected records than one page of import errors holds.
    rows = [make_row(i) for i in range(1, 21)]
    rows += [make_row(i, EMAIL=f"not-an-email-{i}") for i in range(100, 206)]
    write_merge_fields(rows)
    first = push.push(adapter)
    assert (first.pushed, first.rejected) == (20, 106)
    # Partial updates: a reserved field alone, a custom field alone.
    rows[0] = make_row(1, FIRST_NAME="Renamed")
    rows[1] = make_row(2, LOYALTY_TIER="platinum", ORDER_COUNT=99)
    # A contact who left esp_merge_fields has its fields cleared.
    del rows[2]
    write_merge_fields(rows)
    second = push.push(adapter)
    assert (second.changed, second.cleared, second.pushed) == (2, 1, 3)

    paths = {urlsplit(r.url).path for r in sent}
    if vendor == "klaviyo":
        # The import errors came in two pages: the cursor request was validated too.
        assert any("page%5Bcursor%5D" in r.url or "page[cursor]" in r.url for r in sent)
    else:
        assert "/v3/marketing/field_definitions" in paths
    write_kinds = {(r.method, urlsplit(r.url).path) for r in sent if r.method != "GET"}
    assert len(write_kinds) >= 1
    checked = 0
    for req in sent:
        if urlsplit(req.url).path.startswith(OUTSIDE_THE_API):
            continue
        spec.validate(req)
        checked += 1
    assert checked >= 6
    # Nothing a push sends touches consent: no subscription or suppression endpoint.
    assert not [p for p in paths if "subscri" in p or "suppress" in p]


def test_the_validator_refuses_a_body_that_breaks_the_spec(vendor, spec, sandbox):
    """The contract test can fail: a body off the vendor's schema is refused."""
    adapter = make_adapter(vendor, sandbox.esp_url, ESP_API_KEY)
    good = adapter.body([adapter.record(_change())])
    bad = json.loads(good)
    if vendor == "sendgrid":
        bad["contacts"][0]["email"] = 5
        method, path = "PUT", "/v3/marketing/contacts"
    else:
        bad["data"]["type"] = "profile-import"
        method, path = "POST", "/api/profile-bulk-import-jobs"
    headers = dict(adapter.http.headers) | {
        "Content-Type": "application/json" if vendor == "sendgrid" else "application/vnd.api+json"
    }

    def prepared(body: bytes) -> requests.PreparedRequest:
        return requests.Request(
            method, sandbox.esp_url + path, data=body, headers=headers
        ).prepare()

    spec.validate(prepared(good))
    with pytest.raises(InvalidRequestBody):
        spec.validate(prepared(json.dumps(bad).encode()))


def _change():
    from presend.esp import Change

    return Change("1", "valid@example.com", {"FIRST_NAME": "Ada"})
