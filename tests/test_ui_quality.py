"""The "Pre-send quality" view in the real Airflow api-server: login required, what it shows,
and a headless Chromium session through the Airflow UI (screenshots in the test's tmp dir).

The warehouse behind it holds two real gate runs (one passed, one that quarantined a contact
with an invalid email) and their sync reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from test_quality import contacts, write_crm_source, write_merge_fields

from presend import campaign_run, cli, quality, report, warehouse

RUN_CAMPAIGN = "scheduled__2026-11-22T09:00:00+00:00"
RUN_OK = "scheduled__2026-11-22T10:00:00+00:00"
RUN_QUARANTINE = "scheduled__2026-11-22T11:00:00+00:00"
BAD_EMAIL = "no-at-sign.example.com"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_warehouse() -> None:
    """Three real gate runs: one of a campaign DAG (its batches in campaign_runs), two of the
    pre-send sync (their reports in sync_runs)."""
    write_crm_source()
    write_merge_fields(contacts(100))
    quality.gate(RUN_CAMPAIGN)
    with warehouse.connect() as con:
        con.execute(campaign_run.SCHEMA_SQL)
        for batch, hour, pushed in (("eu", 9, 60), ("us", 15, 40)):
            con.execute(
                "insert into campaign_runs (campaign, batch, run_id, send_at, status, "
                "data_age_seconds, quality_status, pushed, skipped, quarantined, rejected, "
                "push_seconds, recorded_at) values ('spring_sale', ?, ?, "
                "make_timestamptz(2026, 11, 22, ?, 45, 0.0, 'UTC'), 'pushed', 1234.4, 'passed', "
                "?, 0, 0, 0, 2.04, now())",
                [batch, RUN_CAMPAIGN, hour, pushed],
            )
    quality.gate(RUN_OK)
    stages = {s: {} for s in report.STAGES}
    report.record(RUN_OK, stages | {"push": {"pushed": 100, "skipped": 0, "rejected": 0}})
    rows = contacts(100)
    rows[20] = ("21", BAD_EMAIL, "Ada", "gold", "h21")
    write_merge_fields(rows)
    quality.gate(RUN_QUARANTINE)
    report.record(RUN_QUARANTINE, stages | {"push": {"pushed": 3, "skipped": 96, "rejected": 1}})


class Server:
    def __init__(self, url: str, password: str, data: Path):
        self.url, self.password, self.data = url, password, data

    def token(self) -> str:
        r = requests.post(
            f"{self.url}/auth/token",
            json={"username": "tester", "password": self.password},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()["access_token"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, migrated_airflow_home):
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    saved = {k: os.environ.get(k) for k in ("PRESEND_DATA_DIR", "PRESEND_WAREHOUSE")}
    os.environ["PRESEND_DATA_DIR"] = str(data)
    os.environ.pop("PRESEND_WAREHOUSE", None)
    try:
        _seed_warehouse()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    home = root / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    port = _free_port()
    env = cli.airflow_env(home) | {
        "PRESEND_DATA_DIR": str(data),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "tester:admin",
        "AIRFLOW__API_AUTH__JWT_SECRET": "presend-ui-test-secret",
    }
    env.pop("PRESEND_WAREHOUSE", None)
    log = (root / "api-server.log").open("w")
    proc = subprocess.Popen(
        [AIRFLOW, "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "api-server did not start:\n" + (root / "api-server.log").read_text()[-3000:]
                )
            time.sleep(1)
        passwords = home / "simple_auth_manager_passwords.json.generated"
        yield Server(url, json.loads(passwords.read_text())["tester"], data)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


PATHS = ["/presend-quality/", "/presend-quality/api/runs", "/presend-quality/data-docs/index.html"]


@pytest.mark.parametrize("path", PATHS)
def test_anonymous_and_forged_requests_are_refused(server, path):
    anonymous = requests.get(server.url + path, timeout=30)
    assert anonymous.status_code == 401
    assert RUN_QUARANTINE not in anonymous.text and "esp_merge_fields" not in anonymous.text

    browser = requests.get(server.url + path, headers={"Accept": "text/html"}, timeout=30)
    assert browser.status_code == 401 and "/auth/login/" in browser.text

    forged = requests.get(
        server.url + path, headers={"Authorization": "Bearer not-a-real-token"}, timeout=30
    )
    assert forged.status_code in (401, 403)
    assert RUN_QUARANTINE not in forged.text


def test_logged_in_user_sees_runs_quarantine_and_push_counts(server):
    auth = {"Authorization": f"Bearer {server.token()}"}
    runs = requests.get(f"{server.url}/presend-quality/api/runs", headers=auth, timeout=30)
    assert runs.status_code == 200
    newest, older, campaign = runs.json()
    assert (newest["run_id"], newest["outcome"], newest["quarantined"]) == (
        RUN_QUARANTINE,
        "quarantined",
        1,
    )
    assert newest["push"] | {"recorded": True} == {
        "pushed": 3,
        "skipped": 96,
        "rejected": 1,
        "quarantined": None,
        "recorded": True,
    }
    assert older["outcome"] == "passed"
    assert (campaign["run_id"], campaign["push"]["pushed"]) == (RUN_CAMPAIGN, 100)

    page = requests.get(f"{server.url}/presend-quality/", headers=auth, timeout=30)
    assert page.status_code == 200
    html = page.text
    assert '<code id="run-id">' + RUN_QUARANTINE in html
    assert "<td>21</td><td>EMAIL is not a well-formed address</td>" in html
    assert "rejected by the ESP <b>1</b>" in html and "pushed <b>3</b>" in html
    assert html.count('class="bar ') == 3  # the chart: one bar per run
    # Contact ids only: no email address of any contact reaches the page.
    assert "@example.com" not in html and BAD_EMAIL not in html

    older_page = requests.get(
        f"{server.url}/presend-quality/", params={"run_id": RUN_OK}, headers=auth, timeout=30
    )
    assert 'id="outcome">passed' in older_page.text
    campaign_page = requests.get(
        f"{server.url}/presend-quality/", params={"run_id": RUN_CAMPAIGN}, headers=auth, timeout=30
    ).text
    # The batch's run report: send time, data age at push, quality, counts, push duration.
    assert (
        "<td>spring_sale</td><td>eu</td><td>2026-11-22 09:45</td><td>pushed</td>"
        "<td>1234.0</td><td>passed</td><td>60</td><td>0</td><td>0</td><td>0</td><td>2.0</td>"
    ) in campaign_page
    assert "pushed <b>100</b>" in campaign_page

    docs = re.search(r'id="run-docs" href="([^"]+)"', html).group(1)
    run_docs = requests.get(server.url + docs, headers=auth, timeout=30)
    assert run_docs.status_code == 200 and "esp_merge_fields" in run_docs.text
    assert "default-src 'self'" in run_docs.headers["content-security-policy"]
    escape = requests.get(
        f"{server.url}/presend-quality/data-docs/..%2F..%2Fwarehouse.duckdb",
        headers=auth,
        timeout=30,
    )
    assert escape.status_code == 404


def test_the_view_is_registered_in_the_airflow_navigation(server):
    auth = {"Authorization": f"Bearer {server.token()}"}
    plugins = requests.get(f"{server.url}/api/v2/plugins", headers=auth, timeout=30).json()
    ours = next(p for p in plugins["plugins"] if p["name"] == "presend_quality")
    assert ours["fastapi_apps"][0]["url_prefix"] == "/presend-quality"
    view = ours["external_views"][0]
    assert (view["name"], view["destination"], view["url_route"]) == (
        "Pre-send quality",
        "nav",
        "presend-quality",
    )


def test_browser_logs_in_and_reads_the_quality_page_and_data_docs(server, tmp_path):
    from playwright.sync_api import sync_playwright

    outside = []

    def loopback_only(route):
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname == "127.0.0.1":
            route.continue_()
        else:  # Data Docs reference CDNs: nothing may leave this machine
            outside.append(url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", loopback_only)
            page.goto(f"{server.url}/auth/login/")
            page.locator("input[name=username]").fill("tester")
            page.locator("input[name=password]").fill(server.password)
            page.locator("button[type=submit]").click()
            page.wait_for_url(re.compile(rf"^{re.escape(server.url)}/?(\?.*)?$"), timeout=60_000)

            # The view inside the Airflow UI, as the navigation opens it.
            page.goto(f"{server.url}/plugin/presend-quality")
            frame = page.frame_locator("iframe").first
            frame.locator("#outcome").wait_for(timeout=60_000)
            assert frame.locator("#outcome").inner_text() == "quarantined"
            assert frame.locator("#run-id").inner_text() == RUN_QUARANTINE
            quarantine = frame.locator("#quarantine").inner_text()
            assert "21" in quarantine and "EMAIL is not a well-formed address" in quarantine
            assert frame.locator("#runs-chart .bar").count() == 3
            page.screenshot(path=str(tmp_path / "quality-in-airflow.png"), full_page=True)

            # The quality page on its own, then its Data Docs link.
            page.goto(f"{server.url}/presend-quality/")
            assert "FAIL" in page.locator("#expectations").inner_text()
            page.screenshot(path=str(tmp_path / "quality-page.png"), full_page=True)
            page.locator("#run-docs").click()
            page.wait_for_load_state()
            text = page.locator("body").inner_text()
            assert "esp_merge_fields" in text and "Must have greater than or equal to" in text
            page.screenshot(path=str(tmp_path / "data-docs.png"), full_page=True)
        finally:
            browser.close()
    for shot in ("quality-in-airflow.png", "quality-page.png", "data-docs.png"):
        assert (tmp_path / shot).stat().st_size > 10_000


def test_the_plugin_does_not_import_great_expectations():
    # The api-server imports every plugin at start-up; GX alone takes seconds to import.
    code = (
        "import sys, presend_ui_plugin, presend.pipeline;"
        "assert 'great_expectations' not in sys.modules, 'GX imported'"
    )
    env = cli.airflow_env()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
