"""presend's LocalExecutor: the workers it forks, and so every task process they fork, start with
dbt (and its DuckDB adapter) already imported; Airflow's own LocalExecutor's do not."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from presend import cli

WORKERS = """
import json, sys
from pathlib import Path
from {module} import LocalExecutor
assert "dbt.cli.main" not in sys.modules
executor = LocalExecutor(parallelism=2)
executor.start()
partial = Path(sys.argv[1] + ".partial")
partial.write_text(json.dumps(list(executor.workers)))
partial.rename(sys.argv[1])  # the test polls for the file: it must never see it half written
sys.stdin.readline()
executor.end()
"""


def _maps_duckdb(pid: int) -> bool:
    """Whether the process has DuckDB's extension module (imported by dbt-duckdb) loaded."""
    return "/_duckdb." in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize(
    ("module", "preloaded"),
    [("presend.executor", True), ("airflow.executors.local_executor", False)],
)
def test_the_executors_workers_start_with_dbt_imported(tmp_path, module, preloaded):
    env = cli.airflow_env(tmp_path / "airflow_home")
    pids = tmp_path / "workers.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKERS.format(module=module), str(pids)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not pids.exists():
            assert proc.poll() is None, "the executor exited before starting its workers"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        workers = json.loads(pids.read_text())
        assert len(workers) == 2
        assert [_maps_duckdb(pid) for pid in workers] == [preloaded, preloaded]
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
