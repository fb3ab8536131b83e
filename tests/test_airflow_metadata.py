"""The embedded default's SQLite metadata DB is shared by every Airflow process (scheduler,
dag-processor, api-server, triggerer, CLI). A command that finds it locked by another process
must wait for it, not fail with "database is locked" after sqlite3's default 5 seconds."""

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from presend import cli

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(fd.readlink() == path for fd in fds.iterdir())
    except (FileNotFoundError, ProcessLookupError):  # a descriptor closed while listing
        return False


def test_an_airflow_command_waits_for_a_metadata_db_locked_by_another_process(
    tmp_path, migrated_airflow_home
):
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    env = cli.airflow_env(home)
    holder = sqlite3.connect(home / "airflow.db", isolation_level=None)
    holder.execute("begin exclusive")  # another process writing: readers and writers must wait
    try:
        started = time.monotonic()
        cmd = subprocess.Popen(
            [AIRFLOW, "pools", "set", "probe", "3", "written while locked"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        db = home / "airflow.db"
        while not _has_open(cmd.pid, db):  # the command is about to query the metadata DB
            assert cmd.poll() is None, cmd.communicate()
            assert time.monotonic() - started < 120, "the command never opened the metadata DB"
            time.sleep(0.1)
        # Well past sqlite3's default 5 s busy timeout, counted from the DB's first opening
        # (the command opens it early and queries it a few seconds later).
        time.sleep(20)
        assert cmd.poll() is None, cmd.communicate()
    finally:
        holder.execute("commit")
        holder.close()
    _, err = cmd.communicate(timeout=120)
    assert cmd.returncode == 0, err[-3000:]
    pools = subprocess.run(
        [AIRFLOW, "pools", "get", "probe", "-o", "plain"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "probe" in pools and "3" in pools


@pytest.mark.parametrize(
    ("cfg", "env", "sqlite"),
    [
        ("", {}, True),  # Airflow's default: SQLite in the home
        ("sqlite:///${AIRFLOW_HOME}/airflow.db", {}, True),
        ("postgresql+psycopg2://postgres@127.0.0.1/airflow", {}, False),
        ("", {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://x@127.0.0.1/a"}, False),
        ("", {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "cat /run/secrets/db"}, False),
    ],
)
def test_only_a_sqlite_metadata_db_gets_the_sqlite_connect_arguments(
    tmp_path, monkeypatch, cfg, env, sqlite
):
    """A home pointed at PostgreSQL (airflow.cfg or environment) must not get sqlite3's
    `timeout` argument: psycopg2 rejects it ("invalid connection option")."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "airflow_home"
    home.mkdir()
    if cfg:
        (home / "airflow.cfg").write_text(f"[database]\nsql_alchemy_conn = {cfg}\n")
    args = cli.airflow_env(home).get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS")
    assert (args == "presend.settings.SQLITE_CONNECT_ARGS") is sqlite
