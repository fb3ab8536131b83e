"""Benchmark of the dbt step in Airflow through Cosmos against a plain `dbt build`, on the same
synthetic raw tables (bench_transform's generator, fixed size).

    .venv/bin/python bench/bench_cosmos.py --contacts 10000 --events 100000 \
        --variants plain,watcher,local --runner scheduler

For each variant the warehouse starts from the same copy of the raw tables (no models yet):
- `plain`: `dbt build` in its own process, as presend_sync runs it;
- a Cosmos variant (`watcher`, `local`, `local-subprocess`, `local-build`): presend_transform
  run by the real scheduler (`--runner scheduler`: scheduler, dag-processor, triggerer and
  api-server, LocalExecutor, SQLite metadata, the `warehouse` pool with one slot) or by
  `airflow dags test` (`--runner dags-test`, one process).

Prints, per variant, the seconds of the dbt step (first dbt task start to last dbt task end;
for `plain` the whole `dbt build` process), the whole DAG run, and the ratio to `plain`
(the goal: at most 1.5).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from presend import settings

DAG_ID = "presend_transform"
# variant -> (execution mode, invocation mode, test behaviour, watcher sensors)
VARIANTS = {
    "watcher": ("watcher", "subprocess", "after_each", "concurrent"),
    "watcher-after": ("watcher", "subprocess", "after_each", "after"),
    "watcher-always": ("watcher", "subprocess", "after_each", "always"),
    "watcher-dbt-runner": ("watcher", "dbt_runner", "after_each", "concurrent"),
    "watcher-dbt-runner-after": ("watcher", "dbt_runner", "after_each", "after"),
    "local": ("local", "dbt_runner", "after_each", ""),
    "local-subprocess": ("local", "subprocess", "after_each", ""),
    "local-build": ("local", "dbt_runner", "build", ""),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else float("nan")


def time_plain(log: Path) -> float:
    """`dbt build` as presend_sync runs it, after a `dbt parse` so that, as in a deployment
    that ran before, dbt parses the project partially."""
    from presend import transform

    with log.open("w") as out, contextlib.redirect_stdout(out):
        transform.run_dbt("parse")
        start = time.perf_counter()
        transform.build()
        return time.perf_counter() - start


def _task_spans(db: Path, run_id: str | None = None) -> dict:
    with sqlite3.connect(db) as con:
        if run_id is None:
            run_id = con.execute(
                "select run_id from dag_run where dag_id = ? order by id desc limit 1", [DAG_ID]
            ).fetchone()[0]
        run = con.execute(
            "select state, start_date, end_date from dag_run where dag_id = ? and run_id = ?",
            [DAG_ID, run_id],
        ).fetchone()
        tis = con.execute(
            "select task_id, state, start_date, end_date, try_number from task_instance "
            "where dag_id = ? and run_id = ?",
            [DAG_ID, run_id],
        ).fetchall()
    dbt = [t for t in tis if t[0].startswith("dbt.")]
    return {
        "state": run[0],
        "run": _ts(run[2]) - _ts(run[1]),
        "dbt": max(_ts(t[3]) for t in dbt) - min(_ts(t[2]) for t in dbt),
        "tasks": len(tis),
        "failed": sorted(t[0] for t in tis if t[1] != "success"),
        "retried": sorted(t[0] for t in tis if (t[4] or 0) > 1),
        "busy": sum(_ts(t[3]) - _ts(t[2]) for t in dbt),
    }


def _airflow(env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args], env=env, check=False, **kwargs)


def time_dags_test(env: dict, log: Path) -> dict:
    start = time.perf_counter()
    with log.open("w") as out:
        proc = _airflow(env, "dags", "test", DAG_ID, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    spans = _task_spans(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    return spans | {"wall": wall, "exit": proc.returncode}


class Scheduler:
    """Airflow's long-running components, as a deployment runs them, for one benchmark."""

    COMPONENTS = (
        ("api-server", "--port", "{port}"),
        ("scheduler",),
        ("dag-processor",),
        ("triggerer",),
    )

    def __init__(self, env: dict, logs: Path):
        port = _free_port()
        self.env = env | {
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
        }
        self.port = port
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Scheduler:
        airflow = str(Path(sys.executable).with_name("airflow"))
        self.logs.mkdir(parents=True, exist_ok=True)
        for args in self.COMPONENTS:
            args = [a.format(port=self.port) for a in args]
            out = (self.logs / f"{args[0]}.log").open("w")
            self.procs.append(
                subprocess.Popen(
                    [airflow, *args],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_for_dag(self, db: Path, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as con:
                if con.execute(
                    "select 1 from serialized_dag where dag_id = ?", [DAG_ID]
                ).fetchone():
                    return
            time.sleep(1)
        raise TimeoutError(f"{DAG_ID} was not parsed within {timeout}s")

    def run(self, db: Path, timeout: float = 1800) -> dict:
        self.wait_for_dag(db)
        _airflow(self.env, "dags", "unpause", DAG_ID, stdout=subprocess.DEVNULL)
        run_id = f"bench__{time.time_ns()}"
        start = time.perf_counter()
        _airflow(self.env, "dags", "trigger", DAG_ID, "--run-id", run_id, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as con:
                state = con.execute(
                    "select state from dag_run where dag_id = ? and run_id = ?", [DAG_ID, run_id]
                ).fetchone()
            if state and state[0] in ("success", "failed"):
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{DAG_ID} did not finish within {timeout}s")
        wall = time.perf_counter() - start
        _airflow(self.env, "dags", "pause", DAG_ID, stdout=subprocess.DEVNULL)
        return _task_spans(db, run_id) | {"wall": wall, "exit": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--variants", default="plain,watcher")
    parser.add_argument("--runner", choices=("scheduler", "dags-test"), default="scheduler")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="presend-bench-cosmos-"))
    os.environ["PRESEND_DATA_DIR"] = str(data_dir)
    os.environ.pop("PRESEND_WAREHOUSE", None)
    os.environ["PRESEND_TASK_POOL"] = settings.WAREHOUSE_POOL
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)

    import bench_transform

    from presend import cli, transform, transform_cosmos

    t0 = time.perf_counter()
    bench_transform.generate(args.contacts, args.events)
    pristine = data_dir / "raw-only.duckdb"
    shutil.copyfile(settings.warehouse_path(), pristine)
    print(
        f"raw data: {args.contacts:,} contacts, {2 * args.contacts:,} orders, "
        f"{args.events:,} events in {time.perf_counter() - t0:.1f}s; runner: {args.runner}",
        flush=True,
    )
    transform_cosmos.ensure_manifest()  # parse-time work, not part of any run
    # Steady state, as after an earlier run: dbt parses partially, plain and Cosmos alike.
    # The same profile, target, vars and warehouse path as the Cosmos tasks use.
    warm = data_dir / "parse-warm"
    log = data_dir / "logs" / "parse-warm.log"
    with log.open("w") as out, contextlib.redirect_stdout(out):
        transform.run_dbt(
            "parse",
            "--profile",
            "presend",
            "--target",
            "duckdb",
            env={"DBT_TARGET_PATH": str(warm)},
        )

    results: dict[str, float] = {}
    for variant in args.variants.split(","):
        shutil.copyfile(pristine, settings.warehouse_path())
        shutil.rmtree(data_dir / "dbt", ignore_errors=True)
        if variant == "plain":
            results[variant] = time_plain(data_dir / "logs" / "plain.log")
            print(f"{variant:18} dbt build {results[variant]:7.1f}s", flush=True)
            continue
        mode, invocation, tests, sensors = VARIANTS[variant]
        home = data_dir / f"airflow_home-{variant}"
        cache = data_dir / f"cosmos-cache-{variant}"
        (cache / f"{DAG_ID}__dbt" / "target").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            warm / "partial_parse.msgpack",
            cache / f"{DAG_ID}__dbt" / "target" / "partial_parse.msgpack",
        )
        env = cli.airflow_env(home) | {
            "AIRFLOW__COSMOS__CACHE_DIR": str(cache),
            "PRESEND_COSMOS_EXECUTION_MODE": mode,
            "PRESEND_COSMOS_INVOCATION_MODE": invocation,
            "PRESEND_COSMOS_TEST_BEHAVIOR": tests,
            # Under `airflow dags test` the sensors must start after the producer (the default).
            "PRESEND_COSMOS_WATCHER_SENSORS": sensors if args.runner == "scheduler" else "",
        }
        env.pop("PRESEND_TASK_POOL", None)
        cli.prepare_airflow(env)
        logs = data_dir / "logs" / variant
        logs.mkdir(parents=True, exist_ok=True)
        if args.runner == "dags-test":
            r = time_dags_test(env, logs / "dags-test.log")
        else:
            with Scheduler(env, logs) as scheduler:
                r = scheduler.run(home / "airflow.db")
        full_parses = sum(
            "Unable to do partial parsing" in log.read_text()
            for log in (home / "logs").rglob("*.log")
        ) + (
            "Unable to do partial parsing" in (logs / "dags-test.log").read_text()
            if args.runner == "dags-test"
            else 0
        )
        results[variant] = r["dbt"]
        ratio = f"{r['dbt'] / results['plain']:5.2f}x" if "plain" in results else "   -  "
        print(
            f"{variant:18} dbt step {r['dbt']:7.1f}s  {ratio}  whole run {r['run']:6.1f}s  "
            f"(wall {r['wall']:.1f}s, {r['tasks']} tasks, task busy {r['busy']:.0f}s, "
            f"state {r['state']}, exit {r['exit']}, dbt full parses {full_parses}"
            + (f", not success: {r['failed']}" if r["failed"] else "")
            + (f", retried: {r['retried']}" if r["retried"] else "")
            + ")",
            flush=True,
        )
    print(f"data dir: {data_dir}")


if __name__ == "__main__":
    main()
