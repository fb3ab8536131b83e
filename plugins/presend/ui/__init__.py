"""The "Pre-send quality" pages served inside the Airflow UI (see plugins/presend_ui_plugin.py)."""
