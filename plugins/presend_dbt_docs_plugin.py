"""Airflow UI plugin: the dbt docs of the presend project under Browse -> dbt Docs.

The presend_transform DAG regenerates the docs (`dbt docs generate --static`, one
self-contained HTML page) after every build; this serves the newest page from the data dir.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse

from presend import settings

URL_PREFIX = "/presend-dbt-docs"


def docs_page():
    return settings.data_dir() / "dbt" / "docs" / "index.html"


def create_app() -> FastAPI:
    app = FastAPI(title="presend dbt docs")

    @app.get("/", response_model=None)
    def index() -> FileResponse | HTMLResponse:
        page = docs_page()
        if not page.exists():
            return HTMLResponse(
                "<p>No dbt docs yet: they are generated at the end of each "
                "<code>presend_transform</code> run.</p>",
                status_code=404,
            )
        return FileResponse(page, media_type="text/html")

    return app


class PresendDbtDocsPlugin(AirflowPlugin):
    name = "presend_dbt_docs"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"name": "presend dbt docs", "app": create_app(), "url_prefix": URL_PREFIX}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "dbt Docs",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "presend-dbt-docs",
        }
    ]
