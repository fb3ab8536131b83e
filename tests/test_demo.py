"""`make demo`'s command: a failed run exits non-zero, says where it failed, and still stops
the sandbox servers; and the demo command, like the DAG, never calls the internet."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from presend import settings

NETGUARD = Path(__file__).parent / "netguard"


def test_a_failed_demo_reports_the_stage_and_stops_the_sandbox(tmp_path, migrated_airflow_home):
    home = tmp_path / "airflow_home"
    shutil.copytree(migrated_airflow_home, home)
    guard_log = tmp_path / "netguard.log"
    guard_log.touch()
    bad = tmp_path / "presend.yml"
    # Every contact without a first name breaks the ESP's length limit, and no quarantine is
    # allowed: the gate blocks the push.
    bad.write_text(
        settings.CONFIG_FILE.read_text()
        .replace('"there"', '"' + "x" * 60 + '"')
        .replace("max_failed_share: 0.05", "max_failed_share: 0.0")
    )
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "PRESEND_DATA_DIR": str(tmp_path / "data"),
        "PRESEND_CONFIG": str(bad),
        "PYTHONPATH": os.pathsep.join([str(NETGUARD), str(settings.PROJECT_DIR / "plugins")]),
        "PRESEND_NETGUARD_LOG": str(guard_log),
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
    # The campaign's run report: both batches blocked by the gate, nothing pushed.
    batches = re.findall(
        r"^  (loyal_first|everyone_else) .* (\w+) +- +(failed) ", proc.stdout, re.M
    )
    assert [(b, s) for b, s, _ in batches] == [
        ("loyal_first", "blocked"),
        ("everyone_else", "blocked"),
    ], proc.stdout
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", proc.stdout)[:2]]
    assert len(ports) == 2
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"sandbox still listening on {port}"
    assert guard_log.read_text() == ""
