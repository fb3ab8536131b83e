"""Airflow plugin: the "Pre-send quality" view (quality gate runs, quarantine, Data Docs).

Airflow imports every top-level .py file in plugins/ as a plugin module; the presend package
itself is excluded in .airflowignore and imported from here like any package.
"""

from typing import ClassVar

from airflow.plugins_manager import AirflowPlugin

from presend.ui.app import PREFIX, create_app


class PresendQualityPlugin(AirflowPlugin):
    name = "presend_quality"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": create_app(), "url_prefix": PREFIX, "name": "Pre-send quality"}
    ]
    external_views: ClassVar[list[dict]] = [
        {
            "name": "Pre-send quality",
            "href": f"{PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "presend-quality",
        }
    ]
