"""The same project builds and tests on PostgreSQL with dbt-postgres (portable SQL), in a
throwaway database, and gives exactly the merge fields worked out by hand for the fixture."""

from __future__ import annotations

import uuid

import psycopg2
import pytest
from test_dbt_fixture import AS_OF, EXPECTED, MERGE_FIELDS, RAW_COLUMNS, STORE, raw_rows

from presend import transform

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

RAW_TABLES_SQL = """
create schema raw;
create table raw.crm_contacts (
    id varchar primary key, lastmodifieddate timestamp not null, archived boolean,
    properties json, _landing_file varchar not null, _loaded_at timestamp not null
);
create table raw.shop_orders (
    id varchar primary key, updated_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
create table raw.shop_products (
    id varchar primary key, updated_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
create table raw.events (
    id varchar primary key, occurred_at timestamp not null, record json,
    _landing_file varchar not null, _loaded_at timestamp not null
);
"""


def _admin(sql: str) -> None:
    """Run one statement on the maintenance database, outside a transaction."""
    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def pg_database(data_dir):
    """A throwaway database holding the fixture's raw tables; dropped afterwards."""
    name = f"presend_test_{uuid.uuid4().hex[:12]}"
    _admin(f'create database "{name}"')
    try:
        with psycopg2.connect(dbname=name, **PG) as conn, conn.cursor() as cur:
            cur.execute(RAW_TABLES_SQL)
            for table, rows in raw_rows().items():
                cols = ", ".join(RAW_COLUMNS[table])
                marks = ", ".join(["%s"] * len(rows[0]))
                cur.executemany(f"insert into raw.{table} ({cols}) values ({marks})", rows)
        yield name
    finally:
        _admin(f'drop database if exists "{name}" with (force)')


def test_the_project_builds_and_tests_on_postgres_with_the_same_merge_fields(pg_database):
    env = {
        "PRESEND_DBT_TARGET": "postgres",
        "PRESEND_PG_HOST": PG["host"],
        "PRESEND_PG_PORT": str(PG["port"]),
        "PRESEND_PG_USER": PG["user"],
        "PRESEND_PG_DATABASE": pg_database,
    }
    proc = transform.run_dbt("build", extra_vars={"as_of": AS_OF, "store_url": STORE}, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "unit_test" in proc.stdout  # the unit tests ran on PostgreSQL too
    cols = ", ".join(f'"{c}"' for c in MERGE_FIELDS)
    with psycopg2.connect(dbname=pg_database, **PG) as conn, conn.cursor() as cur:
        cur.execute(f"select contact_id, {cols} from presend.esp_merge_fields")
        rows = {r[0]: tuple(r[1:]) for r in cur.fetchall()}
    assert rows == EXPECTED
