# presend: `make demo` runs the whole pre-send sync once; `make test` runs the tests.
# Everything installs from uv.lock into .venv on first use (only Python 3.11 is needed).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
RUN := PYTHONPATH=plugins $(VENV)/bin/python
# sqlfluff compiles the dbt project; it needs a warehouse path but no data.
SQLFLUFF := mkdir -p data && PRESEND_WAREHOUSE=data/sqlfluff.duckdb DBT_SEND_ANONYMOUS_USAGE_STATS=false \
	DBT_VERSION_CHECK=false $(VENV)/bin/sqlfluff

export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: demo test airflow sandbox dbt lint format venv clean bench-quality

demo: $(VENV)/.synced  ## run the whole pre-send sync once against the sandbox
	$(RUN) -m presend demo

# Test workers in parallel (pytest-xdist): the tests wait on subprocesses and servers much of
# the time. A file's tests stay on one worker, so module-scoped servers start once.
TEST_WORKERS ?= 2

test: $(VENV)/.synced  ## lint, then every test (TEST_WORKERS=n parallel workers, 0: serial)
	$(VENV)/bin/ruff check .
	$(SQLFLUFF) lint dbt_project
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

airflow: $(VENV)/.synced  ## the Airflow UI on http://localhost:8080 with the sandbox running
	$(RUN) -m presend airflow

sandbox: $(VENV)/.synced  ## the sandbox CRM (:8081) and ESP (:8082) in the foreground
	$(RUN) -m presend sandbox

dbt: $(VENV)/.synced  ## dbt with presend's vars and warehouse, e.g. make dbt ARGS="build"
	$(RUN) -m presend dbt $(ARGS)

bench-quality: $(VENV)/.synced  ## the quality gate at 1M contacts (CONTACTS=n to change; ARGS="--no-bytecode-cache"): time, peak RSS
	$(VENV)/bin/python bench/bench_quality.py $(ARGS)

bench-push: $(VENV)/.synced  ## 100k changed contacts to the sandbox ESP at a rate limit (ARGS="--vendor klaviyo")
	$(VENV)/bin/python bench/bench_push.py $(ARGS)

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(SQLFLUFF) lint dbt_project

format: $(VENV)/.synced
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(SQLFLUFF) fix dbt_project

venv: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

clean:  ## remove the local Airflow home, warehouse and landing zone (not the venv)
	rm -rf airflow_home data

.PHONY: bench-ingest
bench-ingest: $(VENV)/.synced  ## ingest benchmark, not in `make test`: presend vs DuckDB read_json vs dlt
	$(UV) sync --frozen --group bench
	$(RUN) bench/bench_ingest.py $(ARGS)

.PHONY: bench-transform
bench-transform: $(VENV)/.synced  ## dbt: full refresh vs incremental after a 1% change (ARGS="--contacts 1000000 --events 10000000")
	$(RUN) bench/bench_transform.py $(ARGS)

.PHONY: bench-cosmos
bench-cosmos: $(VENV)/.synced  ## dbt through Cosmos (real scheduler) vs a plain dbt build (ARGS="--variants plain,watcher,local --runner dags-test")
	$(RUN) bench/bench_cosmos.py $(ARGS)
