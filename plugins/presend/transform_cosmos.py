"""The transform stage in Airflow through Cosmos: the dbt project as a task group, one task per
model (and its tests), so each is visible in the Airflow UI.

DAG parsing reads a dbt manifest (LoadMode.DBT_MANIFEST) made by `dbt parse` when the project
changed, so parsing neither runs dbt each time nor touches the network. The profile is
dbt_project/profiles.yml, which reads everything from the environment (no secrets in files).
Every dbt task runs in the `warehouse` pool: DuckDB allows one writer per file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from presend import settings, transform

# Before Cosmos or dbt are imported anywhere in this process.
settings.disable_telemetry()

# LOCAL: one dbt invocation per model and per test task, run one at a
# time through the `warehouse` pool. WATCHER (one `dbt build` watched by a sensor per model)
# would be nearly as fast as a plain `dbt build`, but its deferred sensors wait forever under
# `airflow dags test`, which runs tasks one by one. Override: PRESEND_COSMOS_EXECUTION_MODE.
DEFAULT_EXECUTION_MODE = "local"
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
    """
    manifest = manifest_dir() / "manifest.json"
    if manifest.exists() and manifest.stat().st_mtime >= _project_mtime():
        return manifest
    manifest_dir().mkdir(parents=True, exist_ok=True)
    dbt = Path(sys.executable).with_name("dbt")
    proc = subprocess.run(
        [str(dbt), "parse", "--vars", transform.dbt_vars()],
        env=transform.dbt_env() | {"DBT_TARGET_PATH": str(manifest_dir())},
        cwd=settings.DBT_PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not manifest.exists():
        raise RuntimeError(f"dbt parse failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return manifest


def release_warehouse(*_args, **_kwargs) -> None:
    """Close dbt-duckdb's process-wide DuckDB handle so the next writer can open the file."""
    from dbt.adapters.duckdb.connections import DuckDBConnectionManager as manager

    with manager._LOCK:
        if manager._ENV is not None:
            manager._ENV.close()
            manager._ENV = None


def execution_mode_name() -> str:
    return os.environ.get("PRESEND_COSMOS_EXECUTION_MODE", DEFAULT_EXECUTION_MODE)


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
    dbt_env = {k: env[k] for k in ("PRESEND_WAREHOUSE", *settings.TELEMETRY_OFF) if k in env}
    dbt_env["DBT_LOG_PATH"] = str(settings.data_dir() / "dbt" / "logs")
    return DbtTaskGroup(
        group_id=group_id,
        project_config=ProjectConfig(
            dbt_project_path=settings.DBT_PROJECT_DIR,
            manifest_path=ensure_manifest(),
            project_name="presend",
            dbt_vars=transform.dbt_vars_dict(),
            env_vars=dbt_env,
        ),
        profile_config=ProfileConfig(
            profile_name="presend",
            target_name=os.environ.get("PRESEND_DBT_TARGET", "duckdb"),
            profiles_yml_filepath=settings.DBT_PROJECT_DIR / "profiles.yml",
        ),
        execution_config=ExecutionConfig(
            execution_mode=ExecutionMode(execution_mode_name()),
            # In-process dbtRunner: no dbt start-up per task; release_warehouse closes
            # dbt-duckdb's handle after each task, which it otherwise keeps (with the file's
            # write lock) for the life of the process.
            invocation_mode=InvocationMode.DBT_RUNNER,
            dbt_executable_path=Path(sys.executable).with_name("dbt"),
        ),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            test_behavior=TestBehavior.AFTER_EACH,
            source_rendering_behavior=SourceRenderingBehavior.NONE,
            enable_mock_profile=False,
        ),
        operator_args={
            "pool": settings.WAREHOUSE_POOL,
            "install_deps": False,
            "append_env": True,
            "callback": release_warehouse,
        },
    )


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


def warehouse_task_ids(group_id: str = "dbt") -> set[str]:
    """Task ids of presend_transform that open the warehouse, derived from the dbt manifest
    (so a new model must show up as its own task): all of them."""
    import json

    nodes = json.loads(ensure_manifest().read_text())["nodes"].values()
    tested = {
        dep for n in nodes if n["resource_type"] == "test" for dep in n["depends_on"]["nodes"]
    }
    ids = {"generate_docs"}
    if execution_mode_name() == "watcher":
        ids |= {f"{group_id}.dbt_producer_watcher", f"{group_id}.dbt_producer_watcher_done"}
    for node in nodes:
        kind = {"model": "run", "snapshot": "snapshot", "seed": "seed"}.get(node["resource_type"])
        if kind:
            ids.add(f"{group_id}.{node['name']}.{kind}")
            if node["unique_id"] in tested:
                ids.add(f"{group_id}.{node['name']}.test")
    return ids
