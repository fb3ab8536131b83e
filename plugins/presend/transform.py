"""The transform stage: dbt builds the personalization models inside the warehouse.

Each dbt command runs in a process of its own: dbt-duckdb keeps its DuckDB handle open for the
life of the process, which would hold the warehouse's write lock after the build. That process
is a fork of this one running dbt's Python API (dbtRunner), not a new `dbt` executable: a new
dbt pays ~5 s importing dbt and ~5 s more building its machinery on first use, which a fork
inherits once this process has done both (`preload_dbt`; presend's LocalExecutor does it before
forking its workers, so every task starts warm). PRESEND_DBT_FORK=0 runs the `dbt` executable.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing import util as mp_util
from pathlib import Path

from presend import config, settings, transform_events, transform_templates, warehouse


class DbtBuildError(RuntimeError):
    """dbt could not build or test a model."""


@dataclass
class TransformResult:
    models_built: int = 0
    tests_passed: int = 0
    compacted: bool = False
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
    """Environment dbt runs with: where the warehouse is, where dbt may write, no telemetry.

    dbt's log file (data/dbt/logs/dbt.log) gets what the task log shows, not dbt's debug lines
    (every statement, every connection event): writing those cost ~10% of an incremental
    build's time. DBT_LOG_LEVEL_FILE=debug in the environment brings them back.
    """
    settings.disable_telemetry()
    presend = {
        "PRESEND_WAREHOUSE": str(settings.warehouse_path()),
        "DBT_PROFILES_DIR": str(settings.DBT_PROJECT_DIR),
        "DBT_PROJECT_DIR": str(settings.DBT_PROJECT_DIR),
        "DBT_TARGET_PATH": str(target_dir()),
        "DBT_LOG_PATH": str(settings.data_dir() / "dbt" / "logs"),
        # Jinja, not dbt's static parser, reads the models: its Rust extractor (dbt_extractor
        # 0.6.0) hangs for ever in a process forked from one that used it (every parse does,
        # for unit tests' refs) when a model calls both config() and ref(). Forked dbt
        # processes (run_dbt, Cosmos tasks) parse with the same result, a few ms slower.
        "DBT_STATIC_PARSER": "false",
    }
    return {"DBT_LOG_LEVEL_FILE": "info"} | dict(os.environ) | presend


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


def preload_dbt() -> None:
    """Import dbt and its DuckDB adapter in this process and parse the project once, so the
    dbt processes it forks (and those its forked children fork) start warm. Once per process.

    dbt builds much of its machinery on first use (the JSON schemas it validates configs with,
    its manifest classes' (de)serialisers): a parse here builds it for every later fork, and
    its manifest serves their builds while nothing changes (parse_for_forks).
    """
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    settings.disable_telemetry()  # before dbt reads its flags
    # The adapter, and what a build imports beyond a parse (its tasks, the agate tables of
    # query results, sqlparse): ~0.4 s of each forked build at 1M contacts left to the child.
    for module in _PRELOADED_MODULES:
        importlib.import_module(module)
    transform_templates.share_compiled_templates()
    transform_templates.share_type_testers()
    parse_for_forks()


_preloaded = False
_PRELOADED_MODULES = (
    "dbt.adapters.duckdb",
    "dbt.task.build",
    "dbt_common.clients.agate_helper",
    "sqlparse",
)


def parse_for_forks(extra_vars: dict | None = None) -> None:
    """Parse the project in this process with these vars and keep the manifest for the dbt
    processes it forks: while no project file, var or dbt setting of the environment
    changes, a forked build, run or test takes it and does not parse (~1 s of each sync at
    1M contacts: reading dbt's partial-parse state and writing a manifest first). Any
    change and the fork parses as before. Also compiles every macro's template (forks
    inherit dbt's template cache). A project that does not parse keeps nothing: the fork
    reports its errors. The parse writes only to a temporary folder and opens no warehouse
    connection.
    """
    global _parsed
    from dbt.adapters.factory import reset_adapters
    from dbt.cli.main import dbtRunner

    _parsed = None
    saved, cwd = dict(os.environ), os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="presend-dbt-warmup-") as tmp:
            env = dbt_env() | {"DBT_TARGET_PATH": tmp, "DBT_LOG_PATH": tmp}
            os.environ.update(env)
            args = ["--quiet", "parse", "--no-partial-parse", "--no-write-json"]
            vars_json = None
            with contextlib.suppress(Exception):  # a broken config: it still warms dbt up
                vars_json = dbt_vars(extra_vars)
                args += ["--vars", vars_json]
            key = _manifest_key(env, vars_json or "")
            parsed = dbtRunner().invoke(args)
        _compile_templates(parsed.result)
        if parsed.success and vars_json and _manifest_key(env, vars_json) == key:
            _parsed = (key, parsed.result)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        os.chdir(cwd)
        reset_adapters()
        gc.collect()  # the parse's garbage, before forks inherit it


_parsed: tuple[str, object] | None = None
# Settings that do not change what dbt parses (where it writes, how much it logs).
_UNPARSED_ENV = (
    "DBT_TARGET_PATH",
    "DBT_LOG_PATH",
    "DBT_LOG_LEVEL",
    "DBT_LOG_LEVEL_FILE",
    "PRESEND_DUCKDB_MAX_VACUUM_TASKS",  # a DuckDB setting of the profile (see build)
)


def _manifest_key(env: dict[str, str], vars_json: str) -> str:
    """What a parsed manifest depends on: every file of the dbt project (by content), the
    vars, and the dbt and presend settings of the environment (profile, target, warehouse);
    other environment variables the project reads are checked against the manifest's."""
    digest = hashlib.sha256(vars_json.encode())
    for name in sorted(env):
        if name.startswith(("DBT_", "PRESEND_")) and name not in _UNPARSED_ENV:
            digest.update(f"{name}={env[name]}\0".encode())
    root = settings.DBT_PROJECT_DIR
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("target", "logs", "dbt_packages") or not path.is_file():
            continue
        digest.update(f"{relative}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _kept_manifest(argv: list[str], env: dict[str, str]) -> object | None:
    """The manifest parse_for_forks kept, if it fits this command: none for commands that
    are there to parse (parse, compile, docs, ...) or after anything it depends on changed."""
    if _parsed is None or argv[0] not in ("build", "run", "test") or "--vars" not in argv:
        return None
    key, manifest = _parsed
    if _manifest_key(env, argv[argv.index("--vars") + 1]) != key:
        return None
    # The environment variables the project's files read (env_var()), as dbt recorded them.
    read = getattr(manifest, "env_vars", {})
    return manifest if all(env.get(name) == value for name, value in read.items()) else None


def _compile_templates(manifest: object) -> None:
    """Compile the Jinja template of every macro of the parsed project (dbt's and the
    adapter's included) and of every node's SQL, which forks inherit. dbt compiles a macro
    the first time a process calls it, and a build's materializations, hooks and tests call
    ~180: every forked build compiled them again (~0.9 s of its threads' time in an incremental
    build at 1M; compiling all ~550 here costs ~0.8 s once per process); and it compiles each
    node's SQL from its text at every build (transform_templates keeps that code by text).
    Both caches are keyed by the text, so a macro or model edited since is compiled afresh."""
    from dbt_common.clients.jinja import get_template, template_cache

    for macro in getattr(manifest, "macros", {}).values():
        with contextlib.suppress(Exception):  # a macro that does not compile fails where used
            template_cache.get_node_template(macro)
    for node in getattr(manifest, "nodes", {}).values():
        with contextlib.suppress(Exception):  # likewise a node
            get_template(node.raw_code, {}, node)


def forks_dbt() -> bool:
    """Whether run_dbt forks a warm process (the default) or runs the `dbt` executable."""
    return os.environ.get("PRESEND_DBT_FORK", "1") != "0" and hasattr(os, "fork")


def run_dbt(
    *args: str,
    extra_vars: dict | None = None,
    env: dict[str, str] | None = None,
    results_only: bool = False,
) -> subprocess.CompletedProcess:
    """Run a dbt command with presend's environment and vars, in a process of its own.

    Its output is echoed (into the task log) and kept in the result's `stdout`; its exit code
    is dbt's (0 success, 1 a node failed, 2 dbt itself failed).

    `results_only`: of dbt's artifacts, a forked build, run or test writes run_results.json
    only, not manifest.json (the project's, as `dbt parse` writes it; serialising it costs
    ~0.17 s at the end of every build). The `dbt` executable writes both.
    """
    argv = [*args, "--vars", dbt_vars(extra_vars)]
    child_env = dbt_env() | (env or {})
    if not forks_dbt():
        dbt = Path(sys.executable).with_name("dbt")
        proc = subprocess.run(
            [str(dbt), *argv],
            env=child_env,
            cwd=settings.DBT_PROJECT_DIR,
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    else:
        proc = _run_forked(argv, child_env, results_only=results_only)
    print(proc.stdout, end="", flush=True)
    return proc


def _run_forked(
    argv: list[str], env: dict[str, str], results_only: bool = False
) -> subprocess.CompletedProcess:
    """dbtRunner in a forked child; its stdout and stderr come back through a pipe."""
    preload_dbt()
    manifest = _kept_manifest(argv, env)
    results_file = None
    if results_only and argv[0] in ("build", "run", "test"):
        # dbt writes both artifacts or neither: the child writes the results itself.
        argv = [*argv, "--no-write-json"]
        results_file = Path(env["DBT_TARGET_PATH"]) / "run_results.json"
    read_end, write_end = os.pipe()
    # What this process holds (dbt's modules, ...) moves to the permanent generation: the
    # child's garbage collector would otherwise walk it on every collection, and touching it
    # copies its pages (measured: ~20% more of dbt's own time in the child).
    parent = os.getpid()
    gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            _dbt_child(argv, env, write_end, parent, manifest, results_file)
    finally:
        gc.unfreeze()
    os.close(write_end)
    with open(read_end, "rb") as output:
        text = output.read().decode("utf-8", errors="replace")
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["dbt", *argv], os.waitstatus_to_exitcode(status), text)


def _dbt_child(
    argv: list[str],
    env: dict[str, str],
    output_fd: int,
    parent: int,
    manifest: object | None,
    results_file: Path | None,
) -> None:
    code = 2
    try:
        # Killed with the process that forked it (e.g. a task Airflow stops), so no dbt is
        # left holding the warehouse's write lock; gone already if it died before this line.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(code)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = sys.stdout
        os.environ.clear()
        os.environ.update(env)
        os.chdir(settings.DBT_PROJECT_DIR)
        from dbt.cli.main import dbtRunner

        transform_events.skip_unlogged_events()
        inherited = set(mp_util._finalizer_registry)
        try:
            result = dbtRunner(manifest=manifest).invoke(argv)
        finally:
            # dbt's locks are named semaphores of a "spawn" context, unlinked by finalizers
            # that run at interpreter exit, which os._exit skips: run those made here.
            for key, finalizer in list(mp_util._finalizer_registry.items()):
                if key not in inherited:
                    finalizer()
        if results_file is not None and hasattr(result.result, "write"):
            result.result.write(str(results_file))
        # As the `dbt` executable exits: 1 when a node failed, 2 when dbt itself did.
        code = 0 if result.success else 1 if result.exception is None else 2
        if result.exception is not None:
            print(f"dbt failed: {result.exception!r}")
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def compaction_due(now: datetime | None = None) -> bool:
    """Whether the pipeline's next build compacts the warehouse: none has yet, or the last
    one did at least transform.compact_every_hours ago (config/presend.yml)."""
    try:
        last = datetime.fromisoformat(_compaction_stamp().read_text().strip())
    except (OSError, ValueError):
        return True
    hours = config.load().transform_compact_every_hours
    return (now or datetime.now(UTC)) - last >= timedelta(hours=hours)


def _compaction_stamp() -> Path:
    """When a build last compacted the warehouse (UTC, ISO 8601): a file beside it."""
    return Path(f"{settings.warehouse_path()}.compacted_at")


def build(
    *args: str, extra_vars: dict | None = None, compact: bool | None = None
) -> TransformResult:
    """`dbt build` every model, snapshot and test; raise naming each failure.

    `args` go to dbt build (e.g. "--full-refresh", "--select", "...").

    `compact`: whether DuckDB may compact the tables the build writes while it saves them to
    the file (its checkpoints): merge the row groups the incremental models' deletes left
    part-empty, and the small ones their appends made. At 1M contacts that rewrites ~0.3 s of
    data in the middle of a 4 s incremental build, each time a little of it. Without it a
    table gains a small row group per build until one compacts. None: as configured, a
    `--full-refresh` or compaction_due() (by default the first build of each day).
    """
    # dbt opens the warehouse itself: opening it here too costs ~20-30 ms at 1M contacts.
    warehouse.prepare_write()
    if compact is None:
        compact = "--full-refresh" in args or compaction_due()
    results_file = target_dir() / "run_results.json"
    results_file.unlink(missing_ok=True)
    proc = run_dbt(
        "build",
        *args,
        extra_vars=extra_vars,
        env={} if compact else {"PRESEND_DUCKDB_MAX_VACUUM_TASKS": "0"},
        results_only=True,
    )
    if not results_file.exists():
        tail = "\n".join(proc.stdout.strip().splitlines()[-12:])
        raise DbtBuildError(f"dbt build exited with code {proc.returncode}:\n{tail}")
    result = TransformResult(compacted=compact)
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
    if compact:
        _compaction_stamp().write_text(datetime.now(UTC).isoformat())
    return result
