"""`make demo`'s command: a failed run exits non-zero, says where it failed, and still stops
the sandbox servers."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

from presend import settings


def test_a_failed_demo_reports_the_stage_and_stops_the_sandbox(tmp_path, migrated_airflow_home):
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    bad = tmp_path / "presend.yml"
    bad.write_text(settings.CONFIG_FILE.read_text().replace('"there"', '"' + "x" * 60 + '"'))
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "PRESEND_DATA_DIR": str(tmp_path / "data"),
        "PRESEND_CONFIG": str(bad),
        "PYTHONPATH": str(settings.PROJECT_DIR / "plugins"),
    }
    env.pop("PRESEND_TASK_POOL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "presend", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "FAILED (failed at quality)" in proc.stdout
    assert "0 contacts pushed" in proc.stdout
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", proc.stdout)[:2]]
    assert len(ports) == 2
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"sandbox still listening on {port}"
