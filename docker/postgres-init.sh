#!/bin/sh
# Run once by the postgres image, on an empty data volume (mounted into /docker-entrypoint-initdb.d by compose.yaml):
# one role and one database each for Airflow's metadata and MLflow's backend store, each role owning its database.
# The passwords come from the container's environment (.env), never from this file; psql quotes them (:'name').
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    -v airflow_password="${AIRFLOW_DB_PASSWORD:?}" -v mlflow_password="${MLFLOW_DB_PASSWORD:?}" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
