"""The transform stage: dbt builds the personalization models inside the warehouse.

dbt runs in its own process: dbt-duckdb keeps its DuckDB handle open for the life of the
process, which would hold the warehouse's write lock after the build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from presend import config, settings, warehouse


class DbtBuildError(RuntimeError):
    """dbt could not build or test a model."""


@dataclass
class TransformResult:
    models_built: int = 0
    tests_passed: int = 0
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# What the pipeline builds: every model, snapshot and data test, but not dbt's unit tests,
# which check the models' SQL on fixed inputs, not the data (dbt advises leaving them out of
# production runs; `make test` runs them).
SYNC_BUILD_ARGS = ("--exclude-resource-type", "unit_test")


def target_dir() -> Path:
    return settings.data_dir() / "dbt" / "target"


def dbt_env() -> dict[str, str]:
    """Environment dbt runs with: where the warehouse is, where dbt may write, no telemetry."""
    settings.disable_telemetry()
    return os.environ | {
        "PRESEND_WAREHOUSE": str(settings.warehouse_path()),
        "DBT_PROFILES_DIR": str(settings.DBT_PROJECT_DIR),
        "DBT_PROJECT_DIR": str(settings.DBT_PROJECT_DIR),
        "DBT_TARGET_PATH": str(target_dir()),
        "DBT_LOG_PATH": str(settings.data_dir() / "dbt" / "logs"),
    }


def dbt_vars_dict(extra: dict | None = None) -> dict:
    """The dbt vars presend passes: merge-field defaults and the store URL from
    config/presend.yml, plus `extra` (e.g. `as_of` to pin the reference time)."""
    cfg = config.load()
    return {
        "merge_field_defaults": cfg.merge_field_defaults,
        "store_url": cfg.transform_store_url,
    } | (extra or {})


def dbt_vars(extra: dict | None = None) -> str:
    """dbt_vars_dict as the JSON dbt's `--vars` takes."""
    return json.dumps(dbt_vars_dict(extra))


def run_dbt(
    *args: str, extra_vars: dict | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a dbt command with presend's environment and vars.

    Its output is echoed (into the task log) and kept in the result's `stdout`.
    """
    dbt = Path(sys.executable).with_name("dbt")
    proc = subprocess.run(
        [str(dbt), *args, "--vars", dbt_vars(extra_vars)],
        env=dbt_env() | (env or {}),
        cwd=settings.DBT_PROJECT_DIR,
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    print(proc.stdout, end="", flush=True)
    return proc


def build(*args: str, extra_vars: dict | None = None) -> TransformResult:
    """`dbt build` every model, snapshot and test; raise naming each failure.

    `args` go to dbt build (e.g. "--full-refresh", "--select", "...").
    """
    with warehouse.connect():  # checks the pool and creates the file's folder
        pass
    results_file = target_dir() / "run_results.json"
    results_file.unlink(missing_ok=True)
    proc = run_dbt("build", *args, extra_vars=extra_vars)
    if not results_file.exists():
        tail = "\n".join(proc.stdout.strip().splitlines()[-12:])
        raise DbtBuildError(f"dbt build exited with code {proc.returncode}:\n{tail}")
    result = TransformResult()
    for r in json.loads(results_file.read_text())["results"]:
        parts = r["unique_id"].split(".")
        # A data test's id ends in a hash: test.<project>.<test name>.<hash>
        kind, name = parts[0], parts[2] if parts[0] == "test" else parts[-1]
        if r["status"] in ("success", "pass"):
            if kind == "model":
                result.models_built += 1
            elif kind in ("test", "unit_test"):
                result.tests_passed += 1
        elif r["status"] not in ("skipped", "warn"):
            result.failures.append(f"{kind} {name}: {r['status']} ({r.get('message')})")
    if proc.returncode != 0 or result.failures:
        raise DbtBuildError(
            f"dbt build failed (exit {proc.returncode}): " + "; ".join(result.failures)
        )
    return result
