"""`python -m presend …`: the demo, the local Airflow UI, and the sandbox servers."""

from __future__ import annotations

import argparse
import configparser
import os
import signal
import subprocess
import sys
from pathlib import Path

from presend import settings

DAG_ID = "presend_sync"


EXECUTOR = "presend.executor.LocalExecutor"


def airflow_env(airflow_home: Path | None = None) -> dict[str, str]:
    """Environment of the embedded default: project-local AIRFLOW_HOME with SQLite metadata."""
    settings.disable_telemetry()
    home = airflow_home or Path(
        os.environ.get("AIRFLOW_HOME", settings.PROJECT_DIR / "airflow_home")
    )
    plugins = str(settings.PROJECT_DIR / "plugins")
    pythonpath = os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.PROJECT_DIR / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": plugins,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "PYTHONPATH": pythonpath,
        # `airflow standalone` starts its components as `airflow …` found on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PRESEND_DATA_DIR": str(settings.data_dir()),
    }
    # Airflow's LocalExecutor, whose tasks start with dbt imported (presend.executor).
    env.setdefault("AIRFLOW__CORE__EXECUTOR", EXECUTOR)
    if _metadata_is_sqlite(env, home):
        for key in ("SQL_ALCHEMY_CONNECT_ARGS", "SQL_ALCHEMY_CONNECT_ARGS_ASYNC"):
            env.setdefault(f"AIRFLOW__DATABASE__{key}", "presend.settings.SQLITE_CONNECT_ARGS")
    return env


def _metadata_is_sqlite(env: dict[str, str], home: Path) -> bool:
    """Whether Airflow's metadata DB is SQLite (the default): not when the environment or the
    home's airflow.cfg names another database (e.g. PostgreSQL, where the SQLite connect
    arguments would be rejected)."""
    prefix = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
    if env.get(f"{prefix}_CMD") or env.get(f"{prefix}_SECRET"):
        return False
    conn = env.get(prefix)
    if conn is None and (home / "airflow.cfg").exists():
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(home / "airflow.cfg")
        conn = cfg.get("database", "sql_alchemy_conn", fallback=None)
    return conn is None or conn.startswith("sqlite")


def _airflow(
    env: dict[str, str], *args: str, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("airflow")), *args]
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, env=env, check=check, stdout=out)


def prepare_airflow(env: dict[str, str]) -> None:
    """Create (or upgrade) the metadata DB and the `warehouse` pool; cheap when done before."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".presend-prepared"
    import airflow

    if marker.exists() and marker.read_text() == airflow.__version__:
        return
    print(f"presend: preparing Airflow metadata in {home} …", flush=True)
    _airflow(env, "db", "migrate", quiet=True)
    _airflow(
        env,
        "pools",
        "set",
        settings.WAREHOUSE_POOL,
        "1",
        "DuckDB allows one writer per file",
        quiet=True,
    )
    marker.write_text(airflow.__version__)


def dags_test(env: dict[str, str], args: list[str], log_file: Path | None = None) -> int:
    """`airflow dags test <args>`; returns its exit code. With `log_file`, Airflow's output
    goes there instead of the terminal."""
    cmd = [str(Path(sys.executable).with_name("airflow")), "dags", "test", *args]
    if log_file is None:
        return subprocess.run(cmd, env=env, check=False).returncode
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as out:
        return subprocess.run(
            cmd, env=env, check=False, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def run_sync(env: dict[str, str], log_file: Path | None = None) -> int:
    """One pre-send sync through Airflow (`airflow dags test`); returns its exit code."""
    return dags_test(env, [DAG_ID], log_file)


def demo(args: argparse.Namespace) -> int:
    """A sample campaign's two batches through Airflow against the sandbox (presend.demo)."""
    from presend import demo as sample
    from presend.sandbox.server import Sandbox

    env = airflow_env()
    prepare_airflow(env)
    esp_state = settings.data_dir() / "sandbox" / "esp.json"
    with Sandbox(contacts=args.contacts, seed=args.seed, esp_state=esp_state) as sandbox:
        print(f"presend: sandbox CRM {sandbox.crm_url}, ESP {sandbox.esp_url}", flush=True)
        return sample.run(env, sandbox.connection_env(), args.verbose)


def airflow_ui(args: argparse.Namespace) -> int:
    from presend.sandbox.server import Sandbox

    env = airflow_env()
    prepare_airflow(env)
    esp_state = settings.data_dir() / "sandbox" / "esp.json"
    with Sandbox(contacts=args.contacts, seed=args.seed, esp_state=esp_state) as sandbox:
        print(f"presend: sandbox CRM {sandbox.crm_url}, ESP {sandbox.esp_url}", flush=True)
        try:
            return _airflow(env | sandbox.connection_env(), "standalone", check=False).returncode
        except KeyboardInterrupt:
            return 0


def sandbox_serve(args: argparse.Namespace) -> int:
    from presend.sandbox import server

    return (
        server.main(
            [
                "--ready-file",
                str(args.ready_file),
                "--crm-port",
                str(args.crm_port),
                "--esp-port",
                str(args.esp_port),
                "--shop-port",
                str(args.shop_port),
                "--events-port",
                str(args.events_port),
                "--contacts",
                str(args.contacts),
                "--seed",
                str(args.seed),
            ]
        )
        or 0
    )


def dbt(args: argparse.Namespace) -> int:
    from presend import transform

    return transform.run_dbt(*args.dbt_args).returncode


def preview(args: argparse.Namespace) -> int:
    """Dry run of the push: counts and a sample of field diffs; no request to the ESP."""
    import json

    from presend import config
    from presend import push as push_stage

    vendor = args.vendor or config.load().esp_vendor
    doc = push_stage.preview(vendor, sample=args.sample)
    print(json.dumps(doc, indent=2) if args.json else push_stage.format_preview(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presend")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("demo", demo, "a sample campaign's two batches synced against the sandbox"),
        ("airflow", airflow_ui, "Airflow standalone on localhost:8080 with the sandbox"),
        ("sandbox", sandbox_serve, "serve the sandbox CRM and ESP in the foreground"),
    ):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--contacts", type=int, default=1000, help="sandbox CRM size")
        p.add_argument("--seed", type=int, default=42, help="sandbox data seed")
        if name == "demo":
            p.add_argument("--verbose", action="store_true", help="show Airflow's output")
        if name == "sandbox":
            p.add_argument("--ready-file", type=Path, default=Path("sandbox-ready.json"))
            p.add_argument("--crm-port", type=int, default=8081)
            p.add_argument("--esp-port", type=int, default=8082)
            p.add_argument("--shop-port", type=int, default=8083)
            p.add_argument("--events-port", type=int, default=8084)
    p = sub.add_parser("preview", help="what the push would send now, without sending it")
    p.set_defaults(func=preview)
    p.add_argument("--vendor", choices=("sendgrid", "klaviyo"), help="default: esp.vendor")
    p.add_argument("--sample", type=int, default=5, help="contacts whose field diffs to show")
    p.add_argument("--json", action="store_true", help="print the preview as JSON")
    p = sub.add_parser("dbt", help="run dbt with presend's warehouse and merge-field vars")
    p.set_defaults(func=dbt)
    p.add_argument("dbt_args", nargs=argparse.REMAINDER, help="dbt command and options")
    args = parser.parse_args(argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the sandbox and other context managers stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return args.func(args)
