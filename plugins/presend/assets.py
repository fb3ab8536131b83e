"""Airflow Assets presend produces: the transform is scheduled on them."""

from __future__ import annotations

from airflow.sdk import Asset

# The raw tables of every source stream, updated by each `presend_ingest` run.
RAW = Asset(name="presend_raw", uri="duckdb://presend/raw")
