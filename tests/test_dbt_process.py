"""How presend runs dbt: a forked process with dbt's exit codes and output, which dies with the
process that started it, leaving the warehouse free for the next writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from presend import load, settings, transform, warehouse


def test_dbt_errors_come_back_as_the_dbt_executable_reports_them(data_dir):
    proc = transform.run_dbt("run-operation", "no_such_macro")
    assert proc.returncode == 2
    assert "could not find a macro with the name 'no_such_macro'" in proc.stdout
    ok = transform.run_dbt("parse")
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert (transform.target_dir() / "manifest.json").exists()


# A query DuckDB takes minutes over, holding the warehouse open read-write meanwhile.
SLOW = """
from presend import transform
transform.run_dbt("show", "--inline", "select count(*) from range(1000000000000)")
"""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_caller_takes_its_dbt_process_with_it_and_frees_the_warehouse(data_dir):
    with warehouse.connect():  # creates the file
        pass
    env = os.environ | {"PYTHONPATH": str(settings.PROJECT_DIR / "plugins")}
    caller = subprocess.Popen([sys.executable, "-c", SLOW], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (dbt := _children(caller.pid)):
            assert caller.poll() is None, "the caller exited before dbt started"
            assert time.monotonic() < deadline, "no dbt process started"
            time.sleep(0.2)
        (dbt_pid,) = dbt
        time.sleep(5)  # dbt has started its query and holds the warehouse's write lock
        assert _alive(dbt_pid)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 20
        while _alive(dbt_pid):
            assert time.monotonic() < deadline, "dbt outlived the process that started it"
            time.sleep(0.2)
    finally:
        caller.kill()
    with duckdb.connect(str(settings.warehouse_path())) as con:  # read-write: the lock is free
        assert con.execute("select 42").fetchone() == (42,)


def test_dbt_log_file_keeps_the_task_log_lines_and_debug_on_request(data_dir, monkeypatch):
    log = settings.data_dir() / "dbt" / "logs" / "dbt.log"
    monkeypatch.delenv("DBT_LOG_LEVEL_FILE", raising=False)
    assert transform.run_dbt("parse").returncode == 0
    lines = log.read_text().splitlines()
    assert any("Running with dbt=" in line for line in lines)
    assert not any("[debug]" in line for line in lines)

    log.unlink()
    monkeypatch.setenv("DBT_LOG_LEVEL_FILE", "debug")
    assert transform.run_dbt("parse").returncode == 0
    assert "[debug]" in log.read_text()


def test_forked_dbt_formats_only_the_events_a_log_takes():
    """In the forked dbt process an event below the level of every log is dropped before
    dbt builds its message or formats its line (transform_events): the SQL statements of a
    build at info. A log at debug still gets them."""
    script = textwrap.dedent(
        """
        import io, json
        from dbt.adapters.events.types import SQLQuery
        from dbt_common.events.base_types import EventLevel
        from dbt_common.events.event_manager import EventManager
        from dbt_common.events.logger import LoggerConfig
        from dbt_common.events.types import Note
        from presend import transform_events

        applied = transform_events.skip_unlogged_events()
        out = io.StringIO()
        manager = EventManager()
        manager.add_logger(LoggerConfig(name="at_info", level=EventLevel.INFO, output_stream=out))
        dropped = SQLQuery(conn_name="model.a", sql="select 42", node_info={})
        manager.fire_event(dropped)
        manager.fire_event(Note(msg="a note at info"))
        at_info = out.getvalue()
        manager.add_logger(LoggerConfig(name="at_debug", level=EventLevel.DEBUG, output_stream=out))
        manager.fire_event(SQLQuery(conn_name="model.b", sql="select 43", node_info={}))
        print(json.dumps({
            "applied": applied,
            "built": "pb_msg" in vars(dropped),
            "at_info": at_info,
            "at_debug": out.getvalue()[len(at_info):],
            "read_later": dropped.message(),
        }))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(transform.__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["applied"]
    assert not seen["built"], "a debug event no log takes still built its message"
    assert "a note at info" in seen["at_info"]
    assert "select 42" not in seen["at_info"]
    assert "On model.b: select 43" in seen["at_debug"]
    assert seen["read_later"] == "On model.a: select 42"


def test_dbt_compiles_a_template_text_once_and_renders_it_with_each_context():
    """transform_templates: dbt's Jinja environments keep the code compiled from a text, so a
    node's SQL, or a test's, is lexed and parsed once per process; each render still uses its
    own context, an edited text compiles afresh, and native rendering keeps its types. The
    agate tables of query results keep their types with a shared type tester."""
    script = textwrap.dedent(
        """
        import json
        import jinja2.environment
        from dbt_common.clients import agate_helper
        from dbt.clients.jinja import get_rendered
        from presend import transform_templates

        generated = []
        generate = jinja2.environment.generate
        jinja2.environment.generate = lambda *a, **k: generated.append(1) or generate(*a, **k)
        applied = transform_templates.share_compiled_templates()
        types = transform_templates.share_type_testers()
        sql = "select {{ n }} from {{ this }}"
        first = get_rendered(sql, {"n": 1, "this": "a"})
        second = get_rendered(sql, {"n": 2, "this": "b"})
        after_two = len(generated)
        edited = get_rendered(sql + " where true", {"n": 3, "this": "c"})
        native = get_rendered("{{ [n, n] }}", {"n": 4}, native=True)
        table = agate_helper.table_from_rows(
            [[1, "2026-11-20 12:00:00", "007"]], ["n", "at", "code"], text_only_columns=["code"]
        )
        again = agate_helper.table_from_rows([[2, None, ""]], ["n", "at", "code"], ["code"])
        print(json.dumps({
            "applied": applied and types,
            "renders": [first, second, edited],
            "native": native,
            "compiled": [after_two, len(generated)],
            "types": [type(t).__name__ for t in table.column_types],
            "rows": [list(map(str, table.rows[0])), list(map(str, again.rows[0]))],
            "empty": list(agate_helper.empty_table().column_names),
        }))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(transform.__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["applied"]
    assert seen["renders"] == ["select 1 from a", "select 2 from b", "select 3 from c where true"]
    assert seen["native"] == [4, 4]
    assert seen["compiled"] == [1, 3], "the same text was compiled again"
    assert seen["types"] == ["Integer", "DateTime", "Text"]
    assert seen["rows"] == [["1", "2026-11-20 12:00:00", "007"], ["2", "None", ""]]
    assert seen["empty"] == []


def test_forked_dbt_finds_every_macro_of_the_project_compiled(data_dir, monkeypatch):
    """preload_dbt compiles every macro's template (the project's, dbt's, the adapter's) into
    dbt's template cache, which each forked build inherits instead of compiling them again."""
    from dbt_common.clients.jinja import template_cache

    # Preloaded afresh: an earlier test of this process may have preloaded a broken config.
    monkeypatch.setattr(transform, "_preloaded", False)
    transform.preload_dbt()
    assert transform.run_dbt("parse").returncode == 0
    manifest = json.loads((transform.target_dir() / "manifest.json").read_text())
    macros = {m["unique_id"]: m["macro_sql"] for m in manifest["macros"].values()}
    assert "macro.presend.scoped_snapshot_staging_table" in macros
    assert "macro.dbt_duckdb.materialization_incremental_duckdb" in macros
    missing = [uid for uid, sql in macros.items() if sql not in template_cache.file_cache]
    assert missing == []


def test_every_model_reads_its_raw_table_while_dbt_caches_the_raw_schema_slowly(
    data_dir, monkeypatch
):
    """The staging models look up their raw tables from 4 threads at once. On a cache miss
    dbt lists the schema and adds it to its relation cache before the schema's tables: a
    lookup in between found the schema cached without its table, and that model built from
    no rows (1 of ~280 fixture builds here). Here the tables enter the cache slowly and each
    lookup of a raw table starts 0.1 s after the one before, so a lookup through dbt's cache
    would miss nearly every time. The forked build inherits the patches."""
    import threading

    from dbt.adapters.base.impl import BaseAdapter
    from dbt.adapters.cache import RelationsCache
    from test_dbt_fixture import AS_OF, EXPECTED, STORE, load_duckdb_fixture, merge_fields_duckdb

    add, get_relation = RelationsCache.add, BaseAdapter.get_relation
    lookups, lock = [0], threading.Lock()

    def slow_add(self, relation):
        add(self, relation)
        if relation.schema == "raw":
            time.sleep(0.3)

    def staggered_get_relation(self, database, schema, identifier):
        if schema == "raw":
            with lock:
                lookups[0] += 1
                delay = 0.1 * (lookups[0] - 1)
            time.sleep(delay)
        return get_relation(self, database, schema, identifier)

    monkeypatch.setattr(RelationsCache, "add", slow_add)
    monkeypatch.setattr(BaseAdapter, "get_relation", staggered_get_relation)
    monkeypatch.setenv("PRESEND_DBT_FORK", "1")
    load_duckdb_fixture()
    transform.build(extra_vars={"as_of": AS_OF, "store_url": STORE})
    assert merge_fields_duckdb() == EXPECTED


def test_no_statement_of_a_build_fails_quietly(data_dir, monkeypatch, tmp_path):
    """DuckDB 2 voids a whole transaction once any statement in it fails, and still answers
    COMMIT with success; dbt-duckdb catches some failures (a relation that does not exist)
    and goes on. A failed statement inside a model's transaction would lose the model's rows
    without any error. Every statement dbt runs must therefore succeed: on empty raw tables,
    then a first build with data, an incremental one and a full refresh."""
    from dbt.adapters.duckdb.environments.local import DuckDBCursorWrapper
    from test_dbt_fixture import AS_OF, STORE, load_duckdb_fixture

    failures = tmp_path / "failed_statements.txt"
    execute = DuckDBCursorWrapper.execute

    def recording_execute(self, sql, bindings=None):
        try:
            return execute(self, sql, bindings)
        except BaseException as exc:
            with failures.open("a") as out:  # the forked build appends here
                out.write(f"{exc!r}\n{sql}\n\n")
            raise

    monkeypatch.setattr(DuckDBCursorWrapper, "execute", recording_execute)
    monkeypatch.setenv("PRESEND_DBT_FORK", "1")
    build_vars = {"as_of": AS_OF, "store_url": STORE}
    with warehouse.connect() as con:  # the raw tables, empty
        load.ensure_schema(con)
    transform.build(extra_vars=build_vars)
    load_duckdb_fixture()
    transform.build(extra_vars=build_vars)
    transform.build(extra_vars=build_vars)
    transform.build("--full-refresh", extra_vars=build_vars)
    assert not failures.exists(), failures.read_text()


def test_a_build_takes_the_manifest_parsed_before_the_fork_until_a_project_file_changes(
    data_dir, monkeypatch, tmp_path
):
    """parse_for_forks keeps a manifest that forked builds use instead of parsing; once a
    file of the project changes, the fork parses again and the change takes effect."""
    project = tmp_path / "dbt_project"
    shutil.copytree(
        settings.DBT_PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    monkeypatch.setattr(settings, "DBT_PROJECT_DIR", project)
    monkeypatch.setattr(transform, "_parsed", transform._parsed)  # restored afterwards
    with warehouse.connect():  # creates the file
        pass
    transform.parse_for_forks()
    # The data folder is new: a fork that parsed would say it found no saved manifest.
    kept = transform.run_dbt("build", "--select", "stg_shop__products")
    assert kept.returncode == 0, kept.stdout[-2000:]
    assert "Starting full parse" not in kept.stdout

    model = project / "models" / "staging" / "stg_shop__products.sql"
    model.write_text(
        model.read_text().replace("select * from renamed", "select *, 1 as added from renamed")
    )
    changed = transform.run_dbt("build", "--select", "stg_shop__products")
    assert changed.returncode == 0, changed.stdout[-2000:]
    assert "Starting full parse" in changed.stdout
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        columns = [row[0] for row in con.execute("describe main.stg_shop__products").fetchall()]
    assert "added" in columns


@pytest.mark.timeout(300)
def test_a_fork_parses_a_model_simple_enough_for_dbts_static_parser(
    data_dir, monkeypatch, tmp_path
):
    """dbt's static parser hangs in a process forked from one that used it (as every parse
    does), on a model calling config() and ref(): a forked parse must not use it."""
    project = tmp_path / "dbt_project"
    shutil.copytree(
        settings.DBT_PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    (project / "models" / "marts" / "plain_products.sql").write_text(
        "{{ config(materialized='view') }}\nselect * from {{ ref('stg_shop__products') }}\n"
    )
    monkeypatch.setattr(settings, "DBT_PROJECT_DIR", project)
    monkeypatch.setattr(transform, "_parsed", transform._parsed)  # restored afterwards
    transform.parse_for_forks()
    parsed = transform.run_dbt("parse")
    assert parsed.returncode == 0, parsed.stdout[-2000:]
    manifest = json.loads((transform.target_dir() / "manifest.json").read_text())
    assert "model.presend.plain_products" in manifest["nodes"]


def test_the_pipelines_build_writes_run_results_and_leaves_the_manifest_alone(
    data_dir, monkeypatch
):
    """transform.build (a fork) writes run_results.json, which it reports from, and leaves
    manifest.json as `dbt parse` wrote it (serialising it would cost every build ~0.17 s)."""
    monkeypatch.setenv("PRESEND_DBT_FORK", "1")
    with warehouse.connect() as con:  # the raw tables, empty
        load.ensure_schema(con)
    assert transform.run_dbt("parse").returncode == 0
    manifest = transform.target_dir() / "manifest.json"
    parsed = manifest.stat().st_mtime_ns
    transform.build(*transform.SYNC_BUILD_ARGS)
    results = json.loads((transform.target_dir() / "run_results.json").read_text())
    assert {r["status"] for r in results["results"]} <= {"success", "pass"}
    assert "model.presend.esp_merge_fields" in {r["unique_id"] for r in results["results"]}
    assert manifest.stat().st_mtime_ns == parsed
