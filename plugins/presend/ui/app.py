"""FastAPI app of the "Pre-send quality" view, mounted by Airflow's api-server.

Airflow mounts plugin apps without authentication; every route here requires the Airflow
login (the JWT in the `_token` cookie the UI sets, or an `Authorization: Bearer` token) and
read access to the presend_sync DAG's runs. Pages show contact ids and counts, never emails.

This module must stay light: the api-server imports it at start-up, so it never imports
Great Expectations (the Data Docs are static files the gate wrote).
"""

from __future__ import annotations

import time
from html import escape
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import duckdb
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from presend import quality_history, settings

DAG_ID = "presend_sync"
PREFIX = "/presend-quality"
# Data Docs pages reference CDN assets and a tracking pixel; the browser may load nothing
# from outside this server (the pages stay readable without their styles).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'"
)


async def require_login(request: Request):
    """The logged-in Airflow user allowed to read presend_sync's runs; 401/403 otherwise."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.security import HTTPAuthorizationCredentials

    header = request.headers.get("authorization", "")
    bearer = None
    if header.lower().startswith("bearer "):
        bearer = HTTPAuthorizationCredentials(scheme="Bearer", credentials=header[7:])
    # Airflow's own resolution: an explicit bearer token, else the session cookie.
    user = await get_user(request, None, bearer)
    allowed = get_auth_manager().is_authorized_dag(
        method="GET",
        access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=DAG_ID),
        user=user,
    )
    if not allowed:
        raise HTTPException(status_code=403, detail=f"no read access to {DAG_ID} runs")
    return user


UserDep = Annotated[object, Depends(require_login)]


def _read(fn, *args):
    """Run a read on the warehouse; a sync holding the write lock answers 503, not 500."""
    if not settings.warehouse_path().exists():
        return None
    for attempt in range(5):
        try:
            with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
                return fn(con, *args)
        except duckdb.IOException:
            if attempt == 4:
                raise HTTPException(
                    status_code=503,
                    detail="the warehouse is being written by a sync; reload in a moment",
                ) from None
            time.sleep(0.2)
    return None


def docs_dir() -> Path:
    return settings.data_dir() / "gx" / "data_docs"


def _docs_href(path: str | None) -> str | None:
    if not path:
        return None
    try:
        rel = Path(path).resolve().relative_to(docs_dir().resolve())
    except ValueError:
        return None
    if not (docs_dir() / rel).is_file():  # an old run's page, pruned by the gate
        return None
    return f"{PREFIX}/data-docs/{quote(rel.as_posix())}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2933; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border-bottom: 1px solid #d9e2ec; padding: .3rem .6rem; text-align: left; }
.badge { padding: .1rem .5rem; border-radius: .6rem; color: #fff; font-weight: 600; }
.passed, .pass { background: #2f855a; } .quarantined { background: #b7791f; }
.blocked, .fail { background: #c53030; } .na { background: #718096; }
.counts span { margin-right: 1.2rem; } pre { white-space: pre-wrap; background: #f5f7fa;
 padding: .6rem; } a { color: #2b6cb0; } .runs a { margin-right: .4rem; }
"""

COLORS = {"passed": "#2f855a", "quarantined": "#b7791f", "blocked": "#c53030"}


def chart_svg(runs: list[dict]) -> str:
    """Last runs, oldest left: bar height = quarantined contacts (at least a stub), colour =
    outcome, failed expectations written above each bar."""
    runs = list(reversed(runs[:30]))
    if not runs:
        return "<p>No gate runs yet.</p>"
    width, height, bar = 30 * 24 + 40, 160, 18
    top = max([r["quarantined"] for r in runs] + [1])
    parts = [
        f'<svg id="runs-chart" role="img" aria-label="last {len(runs)} gate runs" '
        f'width="{width}" height="{height + 40}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="0" y="12" font-size="11">quarantined contacts per run (max {top}); '
        "number above a bar: failed expectations</text>",
    ]
    for i, r in enumerate(runs):
        h = max(3, int((height - 30) * r["quarantined"] / top))
        x, y = 30 + i * 24, height - h
        color = COLORS.get(r["outcome"], "#718096")
        title = escape(
            f"{r['run_id']}: {r['outcome']}, {r['failed']} failed, "
            f"{r['quarantined']} quarantined of {r['rows']} rows"
        )
        parts.append(
            f'<a href="?run_id={quote(r["run_id"])}"><rect class="bar {r["outcome"]}" x="{x}" '
            f'y="{y}" width="{bar}" height="{h}" fill="{color}"><title>{title}</title></rect></a>'
            f'<text x="{x + 4}" y="{y - 3}" font-size="10">{r["failed"]}</text>'
        )
    parts.append(
        f'<line x1="28" y1="{height}" x2="{width}" y2="{height}" stroke="#9aa5b1"/>'
        f'<text x="30" y="{height + 16}" font-size="10">oldest</text>'
        f'<text x="{width - 40}" y="{height + 16}" font-size="10">newest</text></svg>'
    )
    return "".join(parts)


def _status(success) -> str:
    if success is None:
        return '<span class="badge na">n/a</span>'
    return (
        '<span class="badge pass">pass</span>'
        if success
        else '<span class="badge fail">FAIL</span>'
    )


def _page(
    runs: list[dict],
    run: dict | None,
    results: list[dict],
    quarantine: list[dict],
    batches: list[dict],
) -> str:
    e = escape
    body = [f"<h1>Pre-send quality</h1><p>Great Expectations gate of <code>{DAG_ID}</code>."]
    index = docs_dir() / "index.html"
    if index.exists():
        body.append(f' <a href="{PREFIX}/data-docs/index.html">All Data Docs</a>')
    body.append("</p>")
    if run is None:
        body.append("<p>No gate run recorded yet: run the pre-send sync.</p>")
        return _html(body)
    push = run["push"]
    docs = _docs_href(run["data_docs"])
    body += [
        f'<h2>Run <code id="run-id">{e(run["run_id"])}</code> '
        f'<span class="badge {e(run["outcome"])}" id="outcome">{e(run["outcome"])}</span></h2>',
        f"<p>checked {e(run['checked_at'])} UTC"
        + (f' · <a id="run-docs" href="{docs}">Data Docs of this run</a>' if docs else "")
        + "</p>",
        '<p class="counts">'
        f"<span>rows <b>{run['rows']}</b></span>"
        f"<span>expectations passed <b>{run['passed']}</b></span>"
        f"<span>failed <b>{run['failed']}</b></span>"
        f"<span>not applicable <b>{run['not_applicable']}</b></span>"
        f"<span>quarantined <b>{run['quarantined']}</b> ({run['quarantined_share']:.2%})</span>"
        "</p>",
        '<p class="counts" id="push-counts">'
        + (
            f"<span>pushed <b>{push['pushed'] or 0}</b></span>"
            f"<span>skipped (unchanged) <b>{push['skipped'] or 0}</b></span>"
            f"<span>rejected by the ESP <b>{push['rejected'] or 0}</b></span>"
            if push["recorded"]
            else "<span>push: did not run (blocked or not recorded yet)</span>"
        )
        + "</p>",
    ]
    if batches:
        body.append(
            '<h2>Campaign batches</h2><table id="batches"><tr>'
            + "".join(f"<th>{e(h)}</th>" for h in quality_history.BATCH_COLUMNS.values())
            + "</tr>"
        )
        for b in batches:
            body.append(
                "<tr>"
                + "".join(
                    f"<td>{e(str(b[k] if b[k] is not None else ''))}</td>"
                    for k in quality_history.BATCH_COLUMNS
                )
                + "</tr>"
            )
        body.append("</table>")
    if run["message"]:
        body.append(f'<pre id="message">{e(run["message"])}</pre>')
    body.append(f"<h2>Last {len(runs[:30])} runs</h2>{chart_svg(runs)}")
    body.append('<p class="runs">')
    for r in runs[:30]:
        body.append(f'<a href="?run_id={quote(r["run_id"])}">{e(r["run_id"])}</a>')
    body.append("</p>")
    body.append(
        '<h2>Expectations</h2><table id="expectations"><tr><th>status</th><th>suite</th>'
        "<th>expectation</th><th>column</th><th>level</th><th>observed</th><th>meaning</th></tr>"
    )
    for r in results:
        body.append(
            f"<tr><td>{_status(r['success'])}</td><td>{e(r['suite'])}</td>"
            f"<td>{e(r['expectation'])}</td><td>{e(r['column'] or '')}</td>"
            f"<td>{e(r['level'])}</td><td>{e(r['observed'] or '')}</td>"
            f"<td>{e(r['reason'] or '')}</td></tr>"
        )
    body.append("</table>")
    body.append(
        f"<h2>Quarantined contacts ({run['quarantined']})</h2>"
        "<p>Not pushed in this run; the ESP keeps their previous merge fields.</p>"
        '<table id="quarantine"><tr><th>contact id</th><th>reasons</th></tr>'
    )
    for q in quarantine:
        body.append(f"<tr><td>{e(q['contact_id'])}</td><td>{e(q['reasons'])}</td></tr>")
    body.append("</table>")
    if run["quarantined"] > len(quarantine):
        body.append(f"<p>… the first {len(quarantine)} shown (table quality_quarantine).</p>")
    return _html(body)


def _html(body: list[str]) -> str:
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Pre-send quality</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def create_app() -> FastAPI:
    """The app Airflow mounts at /presend-quality."""
    app = FastAPI(
        title="presend: pre-send quality",
        dependencies=[Depends(require_login)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException):
        if exc.status_code in (401, 403) and "text/html" in request.headers.get("accept", ""):
            login = "/auth/login/?next=" + quote(str(request.url))
            return HTMLResponse(
                f'<p>{escape(str(exc.detail))}. <a href="{escape(login)}">Log in to Airflow</a>'
                "</p>",
                status_code=exc.status_code,
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    def quality_page(run_id: str | None = None) -> str:
        def read(con):
            runs = quality_history.recent_runs(con, 30)
            run = next((r for r in runs if r["run_id"] == run_id), None) if run_id else None
            if run_id and run is None:
                raise HTTPException(status_code=404, detail=f"no gate run {run_id}")
            run = run or (runs[0] if runs else None)
            if run is None:
                return runs, None, [], [], []
            return (
                runs,
                run,
                quality_history.results_of(con, run["run_id"]),
                quality_history.quarantine_of(con, run["run_id"]),
                quality_history.batches_of(con, run["run_id"]),
            )

        return _page(*(_read(read) or ([], None, [], [], [])))

    @app.get("/api/runs")
    def runs_json(limit: int = 30) -> list[dict]:
        """The last gate runs with their push counts (what the chart shows)."""
        return _read(quality_history.recent_runs, max(1, min(limit, 500))) or []

    @app.get("/data-docs/{path:path}")
    def data_docs(path: str) -> Response:
        root = docs_dir().resolve()
        target = (root / (path or "index.html")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(status_code=404, detail="no such Data Docs page")
        return FileResponse(target, headers={"Content-Security-Policy": DOCS_CSP})

    return app
