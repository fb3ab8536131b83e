# presend Airflow image: the official Airflow image plus the project's locked dependencies.
# The Airflow version in this tag must equal the apache-airflow pin in pyproject.toml
# (tests/test_docker_compose.py checks it), so installing the lock never changes Airflow itself.
FROM apache/airflow:3.3.2-python3.11

# The DuckDB warehouse + landing zone. Created here, owned by airflow and group 0 (the group
# every compose service runs with), so the `presend-data` named volume inherits a writable dir.
USER root
RUN mkdir -p /opt/airflow/data \
    && chown airflow:0 /opt/airflow/data \
    && chmod 2775 /opt/airflow/data
USER airflow

# Install exactly what uv.lock pins (runtime group only; no dev tools).
COPY pyproject.toml uv.lock /tmp/presend-lock/
RUN pip install --no-cache-dir uv==0.13.8 \
    && cd /tmp/presend-lock \
    && python -m uv export --frozen --no-dev --no-hashes --no-emit-project -o /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip uninstall -y uv \
    && rm -f /tmp/requirements.txt

# The presend package lives in plugins/ (bind-mounted by docker-compose.yaml); make it importable
# from dbt / Great Expectations subprocesses too, not only from Airflow.
ENV PYTHONPATH=/opt/airflow/plugins
