"""The embedded default's SQLite metadata DB is shared by every Airflow process (scheduler,
dag-processor, api-server, triggerer, CLI). A command that finds it locked by another process
must wait for it, not fail with "database is locked" after sqlite3's default 5 seconds."""

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

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
