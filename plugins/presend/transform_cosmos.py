"""The transform stage in Airflow through Cosmos: the dbt project as a task group, one task per
model and one per model's tests, so each is visible in the Airflow UI.

Watcher mode (the default): one `dbt build`, the producer task, is the only dbt task in the
`warehouse` pool (DuckDB allows one writer per file); the per-model and per-test tasks are
sensors that turn green or red as the build reports each node. `make bench-cosmos` measures
it against a plain `dbt build` and against local mode (one dbt invocation per task, each in
the pool), which pays Airflow's task start, dbt's start-up and a project parse per task.

DAG parsing reads a dbt manifest (LoadMode.DBT_MANIFEST) made by `dbt parse` when the project
changed, so parsing neither runs dbt each time nor touches the network. The profile is
dbt_project/profiles.yml, which reads everything from the environment (no secrets in files).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from presend import settings, transform

# Before Cosmos or dbt are imported anywhere in this process.
settings.disable_telemetry()

# Overrides (the benchmark's variants): PRESEND_COSMOS_EXECUTION_MODE (watcher, local),
# PRESEND_COSMOS_INVOCATION_MODE (subprocess, dbt_runner), PRESEND_COSMOS_TEST_BEHAVIOR,
# PRESEND_COSMOS_WATCHER_SENSORS (concurrent, after).
DEFAULT_EXECUTION_MODE = "watcher"
PRODUCER, PRODUCER_DONE = "dbt_producer_watcher", "dbt_producer_watcher_done"
PARTIAL_PARSE = "partial_parse.msgpack"
PROJECT_FILES = ("models", "macros", "snapshots", "seeds", "tests")


def manifest_dir() -> Path:
    """Beside the project (not in the data dir): every DAG parse, whatever its data dir,
    reuses one manifest until a project file changes."""
    return settings.DBT_PROJECT_DIR / "target" / "cosmos"


def docs_dir() -> Path:
    """Where the generated dbt docs site (one static HTML file) is served from."""
    return settings.data_dir() / "dbt" / "docs"


def _project_mtime() -> float:
    project = settings.DBT_PROJECT_DIR
    files = [project / "dbt_project.yml", project / "profiles.yml", settings.CONFIG_FILE]
    for folder in PROJECT_FILES:
        files.extend(p for p in (project / folder).rglob("*") if p.is_file())
    return max(p.stat().st_mtime for p in files if p.exists())


def ensure_manifest() -> Path:
    """The dbt manifest of the project, re-made by `dbt parse` only when a project file changed.

    `dbt parse` reads files only: no warehouse connection, no network (telemetry is off).
    Processes that parse DAGs at the same time (scheduler, dag-processor, workers, parallel
    tests) take turns on a file lock, and the manifest is replaced in one rename, so none
    ever reads a half-written one.
    """
    manifest = manifest_dir() / "manifest.json"
    if _fresh(manifest):
        return manifest
    manifest_dir().mkdir(parents=True, exist_ok=True)
    with open(manifest_dir() / ".parse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(manifest):  # another process parsed while this one waited
            return manifest
        with tempfile.TemporaryDirectory(dir=manifest_dir(), prefix=".parse-") as target:
            partial = manifest_dir() / PARTIAL_PARSE
            if partial.exists():  # dbt re-reads only the files that changed
                shutil.copy2(partial, target)
            dbt = Path(sys.executable).with_name("dbt")
            proc = subprocess.run(
                [str(dbt), "parse", "--vars", transform.dbt_vars()],
                env=transform.dbt_env() | {"DBT_TARGET_PATH": target},
                cwd=settings.DBT_PROJECT_DIR,
                capture_output=True,
                text=True,
                check=False,
            )
            parsed = Path(target) / "manifest.json"
            if proc.returncode != 0 or not parsed.exists():
                raise RuntimeError(f"dbt parse failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            if (Path(target) / PARTIAL_PARSE).exists():
                os.replace(Path(target) / PARTIAL_PARSE, partial)
            os.replace(parsed, manifest)
    return manifest


def _fresh(manifest: Path) -> bool:
    return manifest.exists() and manifest.stat().st_mtime >= _project_mtime()


def release_warehouse(*_args, **_kwargs) -> None:
    """Close dbt-duckdb's process-wide DuckDB handle so the next writer can open the file."""
    connections = sys.modules.get("dbt.adapters.duckdb.connections")
    if connections is None:  # dbt ran in a subprocess: nothing is open here
        return
    manager = connections.DuckDBConnectionManager
    with manager._LOCK:
        if manager._ENV is not None:
            manager._ENV.close()
            manager._ENV = None


def execution_mode_name() -> str:
    return os.environ.get("PRESEND_COSMOS_EXECUTION_MODE", DEFAULT_EXECUTION_MODE)


def invocation_mode_name() -> str:
    """Watcher mode's producer runs dbt in a subprocess: measured faster than dbtRunner, whose
    per-event callback pushes an XCom for every dbt node event inside dbt's own thread."""
    default = "subprocess" if execution_mode_name() == "watcher" else "dbt_runner"
    return os.environ.get("PRESEND_COSMOS_INVOCATION_MODE") or default


def watcher_sensors() -> str:
    """When watcher mode's sensors start: `after` the producer has finished (the default:
    measured fastest on 2 cores, where sensors started with the build compete with it for
    CPU; needs no triggerer; and `airflow dags test`, which runs one task at a time, cannot
    start a sensor that waits for a producer it has not run), `concurrent` with the producer
    (as Cosmos makes a DbtTaskGroup), or `always` (all at once, not waiting for upstream)."""
    return os.environ.get("PRESEND_COSMOS_WATCHER_SENSORS") or "after"


def test_behavior_name() -> str:
    return os.environ.get("PRESEND_COSMOS_TEST_BEHAVIOR", "after_each")


def dbt_task_group(group_id: str = "dbt"):
    """The dbt project as a Cosmos DbtTaskGroup (call inside a DAG)."""
    from cosmos import (
        DbtTaskGroup,
        ExecutionConfig,
        ExecutionMode,
        InvocationMode,
        LoadMode,
        ProfileConfig,
        ProjectConfig,
        RenderConfig,
    )
    from cosmos.constants import SourceRenderingBehavior, TestBehavior

    env = transform.dbt_env()
    keys = ("PRESEND_WAREHOUSE", "DBT_LOG_PATH", "DBT_LOG_LEVEL_FILE", "DBT_STATIC_PARSER")
    keys += tuple(settings.TELEMETRY_OFF)
    dbt_env = {k: env[k] for k in keys if k in env}
    mode = ExecutionMode(execution_mode_name())
    group = DbtTaskGroup(
        group_id=group_id,
        project_config=ProjectConfig(
            dbt_project_path=settings.DBT_PROJECT_DIR,
            manifest_path=ensure_manifest(),
            project_name="presend",
            dbt_vars=transform.dbt_vars_dict(),
            env_vars=dbt_env,
            install_dbt_deps=False,
        ),
        profile_config=ProfileConfig(
            profile_name="presend",
            target_name=os.environ.get("PRESEND_DBT_TARGET", "duckdb"),
            profiles_yml_filepath=settings.DBT_PROJECT_DIR / "profiles.yml",
        ),
        execution_config=ExecutionConfig(
            execution_mode=mode,
            # With the in-process dbtRunner (local mode's default: no dbt start-up per task)
            # release_warehouse closes dbt-duckdb's handle after each task, which it otherwise
            # keeps (with the file's write lock) for the life of the process.
            invocation_mode=InvocationMode(invocation_mode_name()),
            dbt_executable_path=Path(sys.executable).with_name("dbt"),
        ),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            test_behavior=TestBehavior(test_behavior_name()),
            source_rendering_behavior=SourceRenderingBehavior.NONE,
            enable_mock_profile=False,
            # A test on two models (relationships) gets its own task after both: attached to
            # one model, local mode would run it before the other model exists.
            should_detach_multiple_parents_tests=mode == ExecutionMode.LOCAL,
        ),
        operator_args={
            "pool": settings.WAREHOUSE_POOL,
            "append_env": True,
            "callback": release_warehouse,
            # Cosmos would name assets after the path in profiles.yml's default, not the warehouse.
            "emit_datasets": False,
        },
    )
    if mode == ExecutionMode.WATCHER:
        _wire_watcher(group)
    return group


def _wire_watcher(group) -> None:
    """Watcher mode, with one writer: the producer's single `dbt build` is the only task that
    opens the warehouse (the `warehouse` pool); the per-model and per-test tasks are sensors
    that read the producer's results (XCom) and run outside the pool.

    By default the sensors start after the producer has finished (success or not; see
    watcher_sensors): each then settles at its first check, with no deferral. Retries are
    off: Cosmos skips a producer's retry and a sensor's retry runs dbt for its model outside
    the pool, so a failed build is rerun as a new DAG run.
    """
    from cosmos import settings as cosmos_settings

    # Cosmos's "reliable retry" rewrites an Airflow Variable holding every status so far at
    # each of the producer's XCom pushes (several per dbt node): quadratic, and it made the
    # build 5x slower. It only serves a producer retry, which is off here.
    cosmos_settings.enable_watcher_reliable_retry = False
    producer_id = f"{group.group_id}.{PRODUCER}"
    tasks = {t.task_id: t for t in group.iter_tasks()}
    producer = tasks[producer_id]
    producer.retries = 0
    sensors = watcher_sensors()
    for task_id, task in tasks.items():
        if task_id == producer_id:
            continue
        task.pool = "default_pool"
        if task_id.endswith(f".{PRODUCER_DONE}"):
            continue
        task.retries = 0
        task.poke_interval = 1
        if sensors == "after" and not (task.upstream_task_ids & tasks.keys()):
            producer >> task
            task.trigger_rule = "all_done"
        elif sensors == "always":
            # Each sensor reports its own node from the build (a node dbt skipped after an
            # upstream failure reports failed), so none waits for its upstream tasks: the
            # edges still draw the lineage in the graph.
            task.trigger_rule = "always"


def generate_docs() -> dict:
    """`dbt docs generate --static` into docs_dir(), served in the Airflow UI (dbt Docs)."""
    target = settings.data_dir() / "dbt" / "docs-target"
    proc = transform.run_dbt("docs", "generate", "--static", env={"DBT_TARGET_PATH": str(target)})
    page = target / "static_index.html"
    if proc.returncode != 0 or not page.exists():
        raise transform.DbtBuildError(f"dbt docs generate failed (exit {proc.returncode})")
    docs_dir().mkdir(parents=True, exist_ok=True)
    shutil.copyfile(page, docs_dir() / "index.html")
    return {"docs": str(docs_dir() / "index.html")}


def task_ids(group_id: str = "dbt") -> set[str]:
    """Task ids of presend_transform, derived from the dbt manifest (so a new model must show
    up as its own task): one per model, snapshot and seed, one for the tests of each, the
    execution mode's own tasks, and the docs."""
    import json

    nodes = json.loads(ensure_manifest().read_text())["nodes"].values()
    tested = {
        dep for n in nodes if n["resource_type"] == "test" for dep in n["depends_on"]["nodes"]
    }
    ids = {"generate_docs"}
    watcher = execution_mode_name() == "watcher"
    if watcher:
        ids |= {f"{group_id}.{PRODUCER}", f"{group_id}.{PRODUCER_DONE}"}
    for node in nodes:
        kind = {"model": "run", "snapshot": "snapshot", "seed": "seed"}.get(node["resource_type"])
        if kind:
            ids.add(f"{group_id}.{node['name']}.{kind}")
            if node["unique_id"] in tested:
                ids.add(f"{group_id}.{node['name']}.test")
        parents = [p for p in node["depends_on"]["nodes"] if p.split(".")[0] == "model"]
        if not watcher and node["resource_type"] == "test" and len(parents) > 1:
            ids.add(f"{group_id}.{node['name']}_test")  # detached: after all its models
    return ids


def warehouse_task_ids(group_id: str = "dbt") -> set[str]:
    """Task ids of presend_transform that open the warehouse: in watcher mode the producer's
    `dbt build` and the docs; in local mode every dbt task."""
    if execution_mode_name() == "watcher":
        return {"generate_docs", f"{group_id}.{PRODUCER}"}
    return task_ids(group_id)


def tasks_without_retries(group_id: str = "dbt") -> set[str]:
    """Watcher mode's producer and sensors (see _wire_watcher): a failed build is rerun as a
    new DAG run."""
    if execution_mode_name() != "watcher":
        return set()
    return task_ids(group_id) - {"generate_docs", f"{group_id}.{PRODUCER_DONE}"}
