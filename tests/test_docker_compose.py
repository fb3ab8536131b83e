"""Static checks of docker-compose.yaml and Dockerfile (no Docker engine needed)."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())  # also resolves `<<:` merges
SERVICES = COMPOSE["services"]

AIRFLOW_SERVICES = [
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
]
LONG_RUNNING = ["postgres", *AIRFLOW_SERVICES[1:]]
MOUNTS = {
    "/opt/airflow/dags": "./dags",
    "/opt/airflow/plugins": "./plugins",
    "/opt/airflow/dbt_project": "./dbt_project",
    "/opt/airflow/expectations": "./expectations",
    "/opt/airflow/config": "./config",
    "/opt/airflow/data": "presend-data",
}
SECRETS = ["AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY"]
TELEMETRY_OFF = {
    "AIRFLOW__SCARF_ANALYTICS__ENABLED": "false",
    "SCARF_ANALYTICS": "false",
    "DO_NOT_TRACK": "1",
    "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    "GX_ANALYTICS_ENABLED": "false",
}

airflow_service = pytest.mark.parametrize("name", AIRFLOW_SERVICES)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path / volume name, from short-syntax volume entries."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_required_services_exist():
    assert {"postgres", *AIRFLOW_SERVICES} <= SERVICES.keys()


def test_every_service_built_from_the_project_image_is_listed():
    project_image = {n for n, s in SERVICES.items() if s.get("image") == "presend-airflow:latest"}
    assert project_image == set(AIRFLOW_SERVICES)


@airflow_service
def test_local_executor_and_postgres_metadata_db(name):
    env = SERVICES[name]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "presend.executor.LocalExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
        "postgresql+psycopg2://airflow:airflow@postgres/airflow"
    )


@airflow_service
def test_project_dirs_and_shared_data_volume_mounted(name):
    assert MOUNTS.items() <= mounts(SERVICES[name]).items()


@airflow_service
def test_data_dir_env_points_at_the_shared_volume(name):
    service = SERVICES[name]
    assert mounts(service)[service["environment"]["PRESEND_DATA_DIR"]] == "presend-data"


def test_bind_mounted_host_paths_exist():
    sources = {src for s in SERVICES.values() for src in mounts(s).values()}
    missing = [src for src in sources if src.startswith(".") and not (ROOT / src).is_dir()]
    assert not missing, f"bind-mounted dirs missing from the repo: {sorted(missing)}"


def test_named_volumes_are_declared():
    sources = {src for s in SERVICES.values() for src in mounts(s).values()}
    named = {src for src in sources if not src.startswith((".", "/", "~"))}
    assert named <= set(COMPOSE.get("volumes") or {})


def test_depends_on_only_defined_services():
    for service in SERVICES.values():
        assert set(service.get("depends_on", {})) <= SERVICES.keys()


@pytest.mark.parametrize("name", AIRFLOW_SERVICES[1:])
def test_airflow_services_wait_for_init_and_healthy_postgres(name):
    assert SERVICES[name]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "airflow-init": {"condition": "service_completed_successfully"},
    }


def test_init_waits_for_postgres_migrates_and_creates_warehouse_pool():
    init = SERVICES["airflow-init"]
    assert init["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    script = " ".join(init["command"])
    assert "airflow db migrate" in script
    assert 'airflow pools set warehouse 1 "DuckDB single writer"' in script


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthcheck_and_restart(name):
    service = SERVICES[name]
    assert service["healthcheck"]["test"]
    assert service["restart"] == "always"


def test_apiserver_serves_8080_and_is_health_checked_on_version_endpoint():
    api = SERVICES["airflow-apiserver"]
    assert api["command"] == "api-server"
    assert "8080:8080" in api["ports"]
    assert "http://localhost:8080/api/v2/version" in api["healthcheck"]["test"]


@airflow_service
def test_no_secret_literals(name):
    env = SERVICES[name]["environment"]
    for var in [*SECRETS, *(f"AIRFLOW_CONN_PRESEND_{c}" for c in ("CRM", "ESP", "SHOP", "EVENTS"))]:
        assert re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", env[var]), f"{var} must be ${{{var}:?...}}"


def test_env_example_holds_no_secret_values():
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert all(values[var] == "" for var in SECRETS)


@airflow_service
def test_telemetry_is_off(name):
    env = SERVICES[name]["environment"]
    assert {k: env.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF


def test_dockerfile_airflow_version_matches_pyproject_pin():
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_version = re.search(r"^FROM apache/airflow:(\d+\.\d+\.\d+)-python", dockerfile, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==")[1].strip() for d in deps if re.match(r"apache-airflow\s*==", d)]
    assert image_version and pins == [image_version.group(1)]
