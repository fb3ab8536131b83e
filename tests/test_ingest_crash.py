"""A process killed with SIGKILL during extract, or during load (inside the DuckDB
transaction), then rerun, leaves the warehouse equal to a clean run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_ingest_sources import ALL, SIZES, Source, raw_state, run

from presend import settings, warehouse
from presend.sandbox.server import Sandbox

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")

# The child runs the real extract or load and stops at a chosen point so the parent can kill
# it there: after `pause_after` landed pages, or inside the load transaction (after the merge
# and the cursor update, before the commit).
CHILD = """
import json, sys, time
from presend import landing, load
from presend.sources.extract import SourceConnection, extract
from presend import sources

mode, arg, pause_after = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
calls = 0

def pause():
    print("PAUSED", flush=True)
    time.sleep(600)

if mode == "extract":
    write_page = landing.write_page
    def counting_write_page(folder, number, body):
        global calls
        path = write_page(folder, number, body)
        calls += 1
        if calls == pause_after:
            pause()
        return path
    landing.write_page = counting_write_page
    for name, (url, token, page_size) in arg.items():
        import dataclasses
        stream = dataclasses.replace(sources.get(name), page_size=page_size)
        extract(stream, SourceConnection(url, token), load.read_cursor(name), "killed")
else:
    commit_cursor = load._commit_cursor
    def pausing_commit_cursor(con, stream):
        global calls
        commit_cursor(con, stream)
        calls += 1
        if calls == pause_after:
            pause()
    load._commit_cursor = pausing_commit_cursor
    for name, files in arg.items():
        load.load_stream(name, files)
print("DONE", flush=True)
"""


@contextmanager
def paused_child(args: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """Run the child until it pauses; SIGKILL it when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == "PAUSED", f"child did not pause (said {line!r})"
        yield proc
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_at_pause(args: list[str], env: dict) -> None:
    """Run the child until it pauses, then SIGKILL it."""
    with paused_child(args, env):
        pass


def child_env(**extra: str) -> dict:
    return os.environ | {"PYTHONPATH": PLUGINS, **extra}


def warehouse_state() -> dict:
    """What a data engineer can tell apart: raw tables, cursors, rejects."""
    with warehouse.connect(read_only=True) as con:
        cursors = dict(con.execute("select stream, cursor_value from raw.sync_state").fetchall())
        rejects = con.execute("select count(*) from raw.rejects").fetchone()[0]
    return {"raw": {n: raw_state(n) for n in ALL}, "cursors": cursors, "rejects": rejects}


def clean_run_state(src: Source, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.setenv("PRESEND_DATA_DIR", str(tmp_path / "clean"))
    run(src, run_id="clean")
    state = warehouse_state()
    assert all(state["raw"].values())
    return state


@pytest.fixture
def src(tmp_path):
    with Sandbox(seed=33, esp_state=tmp_path / "esp.json", **SIZES) as sb:
        yield Source(sb)


def test_sigkill_during_extract_then_rerun_equals_a_clean_run(data_dir, src, tmp_path, monkeypatch):
    run(src, ["crm_contacts"], run_id="before")  # one stream already has a cursor
    src.advance(0.05)
    arg = {n: (src.urls[n], src.tokens[n], 40) for n in ALL}
    kill_at_pause(["extract", json.dumps(arg), "9"], child_env())
    # The killed attempt left pages (and maybe a half-written .part file) and no cursor.
    killed = list((settings.landing_dir()).rglob("killed/*/*"))
    assert len(killed) >= 9
    # The stream killed mid-way; streams the child had finished extracting stay complete.
    (cut,) = [m.parent for m in settings.landing_dir().rglob("killed/*/.extracting")]
    complete = set(settings.landing_dir().rglob("*/*/page-*.json")) - set(cut.iterdir())
    run(src, run_id="rerun")  # Airflow retries the extract: a new attempt folder
    after_rerun = warehouse_state()
    # The rerun removed the cut attempt's never-loaded pages and kept every complete one.
    assert not cut.exists()
    assert complete and complete <= set(settings.landing_dir().rglob("*/*/page-*.json"))
    assert all(list(d.rglob("page-*.json")) for d in settings.landing_dir().glob("*/rerun"))

    assert after_rerun == clean_run_state(src, tmp_path, monkeypatch)


def test_a_running_extracts_folder_is_kept_until_its_process_dies(data_dir, src):
    arg = {"events": (src.urls["events"], src.tokens["events"], 40)}
    with paused_child(["extract", json.dumps(arg), "3"], child_env()):
        (folder,) = settings.landing_dir().glob("events/killed/*")
        run(src, ["events"], run_id="meanwhile")  # a concurrent run of the stream
        assert len(list(folder.glob("page-*.json"))) == 3  # still being written: kept
    # Killed now: the next extract of the stream removes it, and only it.
    run(src, ["events"], run_id="next")
    assert not folder.exists()
    assert {p.name for p in settings.landing_dir().glob("events/*")} == {"meanwhile", "next"}


@pytest.mark.parametrize("pause_after", [1, 3], ids=["first-stream", "third-stream"])
def test_sigkill_inside_the_load_transaction_then_rerun_equals_a_clean_run(
    data_dir, src, tmp_path, monkeypatch, pause_after
):
    extracted = {n: e.files for n, e in _extract_only(src).items()}
    env = child_env(PRESEND_DATA_DIR=str(data_dir), PRESEND_TASK_POOL="warehouse")
    kill_at_pause(["load", json.dumps(extracted), str(pause_after)], env)
    # The stream being loaded when killed has nothing committed: rows and cursor go together.
    killed_stream = ALL[pause_after - 1]
    state = warehouse_state() if warehouse.exists() else None
    if state is not None:
        assert killed_stream not in state["cursors"]
        assert state["raw"].get(killed_stream, {}) == {}
    from presend import load

    for name, files in extracted.items():  # Airflow retries the load with the same files
        load.load_stream(name, files)
    after_rerun = warehouse_state()

    assert after_rerun == clean_run_state(src, tmp_path, monkeypatch)


def test_sigkill_between_load_batches_keeps_the_first_batch_and_the_rerun_completes(
    data_dir, src, tmp_path, monkeypatch
):
    events = _extract_only(src, ["events"])["events"].files
    assert len(events) > 3
    env = child_env(
        PRESEND_DATA_DIR=str(data_dir),
        PRESEND_TASK_POOL="warehouse",
        PRESEND_LOAD_BATCH_BYTES=str(os.path.getsize(events[0]) * 2),
    )
    kill_at_pause(["load", json.dumps({"events": events}), "2"], env)
    with warehouse.connect(read_only=True) as con:
        loaded_files = con.execute("select count(*) from raw.load_log").fetchone()[0]
        rows = con.execute("select count(*) from raw.events").fetchone()[0]
    assert 0 < loaded_files < len(events)  # the first batch committed, the second did not
    assert rows > 0
    from presend import load

    load.load_stream("events", events)
    after_rerun = warehouse_state()["raw"]["events"]
    monkeypatch.setenv("PRESEND_DATA_DIR", str(tmp_path / "clean"))
    run(src, ["events"], run_id="clean")
    assert after_rerun == raw_state("events")


def _extract_only(src: Source, names: list[str] = ALL) -> dict:
    from presend import load
    from presend.sources.extract import extract

    out = {}
    for name in names:
        out[name] = extract(src.stream(name), src.conn(name), load.read_cursor(name), "run")
    assert all(Path(f).exists() for e in out.values() for f in e.files)
    return out
