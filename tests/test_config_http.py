"""The shared plumbing: config loading, the retrying HTTP session, the warehouse guard."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import urllib3.util.retry
import yaml

from presend import config, http, settings, warehouse
from presend.warehouse import WarehousePoolError

# ---------------------------------------------------------------------------------------------
# presend.config.load
# ---------------------------------------------------------------------------------------------


def _valid_doc() -> dict:
    """The project's own configuration file, as a dict to break one value at a time."""
    return yaml.safe_load(settings.CONFIG_FILE.read_text())


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "presend.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_project_config_loads_with_the_values_in_the_file():
    doc = _valid_doc()
    cfg = config.load(settings.CONFIG_FILE)
    assert cfg.merge_field_defaults == doc["merge_field_defaults"]
    assert cfg.quality_max_failed_share == doc["quality"]["max_failed_share"]
    assert cfg.esp_vendor == doc["esp"]["vendor"]
    assert cfg.esp_batch_max_contacts == doc["esp"]["batch_max_contacts"]
    assert cfg.esp_batch_max_bytes == doc["esp"]["batch_max_bytes"]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("esp", "vendor"),
        ("esp", "batch_max_bytes"),
        ("quality", "max_failed_share"),
        (None, "merge_field_defaults"),
    ],
)
def test_missing_key_names_the_file_and_the_key(tmp_path, section, key):
    doc = _valid_doc()
    del (doc[section] if section else doc)[key]
    path = _write(tmp_path, doc)
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert dotted in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "bad"),
    [
        ("esp", "batch_max_contacts", "many"),
        ("esp", "batch_max_contacts", 2.5),
        ("esp", "batch_max_contacts", True),  # YAML `true` is not a count
        ("esp", "vendor", 42),
        ("quality", "max_failed_share", "five percent"),
        (None, "merge_field_defaults", ["FIRST_NAME"]),
    ],
)
def test_wrong_type_names_the_file_and_the_key(tmp_path, section, key, bad):
    doc = _valid_doc()
    (doc[section] if section else doc)[key] = bad
    path = _write(tmp_path, doc)
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert dotted in str(err.value)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_merge_field_default_names_the_file_and_the_field(tmp_path, empty):
    doc = _valid_doc()
    field = sorted(doc["merge_field_defaults"])[0]
    doc["merge_field_defaults"][field] = empty
    path = _write(tmp_path, doc)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert f"merge_field_defaults.{field}" in str(err.value)


@pytest.mark.parametrize("share", [-0.01, 1.5, 5])
def test_failed_share_outside_zero_to_one_is_refused(tmp_path, share):
    doc = _valid_doc()
    doc["quality"]["max_failed_share"] = share
    path = _write(tmp_path, doc)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert "quality.max_failed_share" in str(err.value)


@pytest.mark.parametrize("share", [0, 1])
def test_failed_share_bounds_are_allowed(tmp_path, share):
    doc = _valid_doc()
    doc["quality"]["max_failed_share"] = share
    assert config.load(_write(tmp_path, doc)).quality_max_failed_share == share


def test_compaction_interval_defaults_to_a_day_and_refuses_a_negative_one(tmp_path):
    doc = _valid_doc()
    assert config.load(_write(tmp_path, doc)).transform_compact_every_hours == 24
    doc["transform"]["compact_every_hours"] = 0
    assert config.load(_write(tmp_path, doc)).transform_compact_every_hours == 0
    del doc["transform"]["compact_every_hours"]
    assert config.load(_write(tmp_path, doc)).transform_compact_every_hours == 24
    doc["transform"]["compact_every_hours"] = -1
    with pytest.raises(config.ConfigError, match=re.escape("transform.compact_every_hours")):
        config.load(_write(tmp_path, doc))


def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "nowhere.yml"
    with pytest.raises(config.ConfigError, match=re.escape(str(path))):
        config.load(path)


# ---------------------------------------------------------------------------------------------
# presend.http.session against a scripted server on loopback
# ---------------------------------------------------------------------------------------------


class ScriptedServer:
    """Answers each request with the next (status, headers) of `script`; records what came in."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.received: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with owner.lock:
                    owner.received.append((self.command, self.path, body))
                    status, headers = owner.script.pop(0) if owner.script else (200, {})
                payload = json.dumps({"attempt": len(owner.received)}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture
def retry_sleeps(monkeypatch) -> list[float]:
    """The waits urllib3's Retry asks for, recorded instead of slept."""
    sleeps: list[float] = []
    monkeypatch.setattr(
        urllib3.util.retry, "time", SimpleNamespace(sleep=sleeps.append, time=time.time)
    )
    return sleeps


def test_session_retries_429_and_503_then_succeeds_resending_the_body(server, retry_sleeps):
    server.script = [(429, {"Retry-After": "7"}), (503, {})]
    client = http.session(retries=3, backoff_factor=0.01, backoff_max=0.05)
    resp = client.post(f"{server.url}/upsert", json={"id": 1})
    assert resp.status_code == 200
    assert resp.json() == {"attempt": 3}
    assert [(m, p) for m, p, _ in server.received] == [("POST", "/upsert")] * 3
    assert {body for _, _, body in server.received} == {json.dumps({"id": 1}).encode()}
    # The 429's Retry-After is what the client waited before its second attempt.
    assert retry_sleeps[0] == 7
    assert all(s <= 0.05 for s in retry_sleeps[1:])


def test_session_gives_up_after_retries_and_returns_the_final_response(server, retry_sleeps):
    retries = 2
    server.script = [(503, {})] * (retries + 1) + [(200, {})]
    client = http.session(retries=retries, backoff_factor=0.01, backoff_max=0.05)
    resp = client.get(f"{server.url}/flaky")
    assert resp.status_code == 503
    assert resp.json() == {"attempt": retries + 1}
    assert len(server.received) == retries + 1


def test_session_does_not_retry_a_client_error(server, retry_sleeps):
    server.script = [(401, {})]
    client = http.session(retries=3, backoff_factor=0.01)
    resp = client.put(f"{server.url}/contacts", json={})
    assert resp.status_code == 401
    assert len(server.received) == 1
    assert retry_sleeps == []


def test_session_sends_the_given_headers(server):
    client = http.session(headers={"Authorization": "Bearer t0ken"})
    seen = {}

    def hook(resp, *args, **kwargs):
        seen.update(resp.request.headers)

    client.hooks["response"].append(hook)
    assert client.get(server.url).status_code == 200
    assert seen["Authorization"] == "Bearer t0ken"
    assert seen["User-Agent"].startswith("presend/")


# ---------------------------------------------------------------------------------------------
# presend.warehouse.connect
# ---------------------------------------------------------------------------------------------


def test_read_write_connect_outside_the_warehouse_pool_is_refused(data_dir, monkeypatch):
    monkeypatch.setenv("PRESEND_TASK_POOL", "default_pool")
    with pytest.raises(WarehousePoolError, match="default_pool"), warehouse.connect():
        pass
    assert not settings.warehouse_path().exists()


def test_read_write_connect_in_the_warehouse_pool_creates_the_file(data_dir):
    with warehouse.connect() as con:
        con.execute("create table t as select 42 as answer")
    assert settings.warehouse_path().is_file()
    assert settings.warehouse_path().parent == data_dir
    with warehouse.connect(read_only=True) as con:
        assert con.execute("select answer from t").fetchall() == [(42,)]


def test_read_only_connect_of_a_missing_warehouse_raises_file_not_found(data_dir):
    missing = re.escape(str(settings.warehouse_path()))
    with pytest.raises(FileNotFoundError, match=missing), warehouse.connect(read_only=True):
        pass
    assert not settings.warehouse_path().exists()
