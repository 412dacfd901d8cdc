#!/bin/sh
# Creates the roles and databases of the stack on the first start of the postgres service
# (the official image runs /docker-entrypoint-initdb.d/*.sh only while the data volume is
# empty): role and database `prefect` for the Prefect server, `mlflow` for MLflow, `optuna`
# for the sweeps' Optuna studies (a database of its own: MLflow and Optuna both keep their
# schema version in a table named alembic_version). Each
# role owns its database and has no other rights. The passwords come from the service's
# environment; psql's :'var' quoting keeps them out of the SQL text.
set -eu

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${OPTUNA_DB_PASSWORD:?OPTUNA_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set=prefect_password="$PREFECT_DB_PASSWORD" \
    --set=mlflow_password="$MLFLOW_DB_PASSWORD" \
    --set=optuna_password="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER optuna;
-- Prefect's migrations create pg_trgm themselves; doing it here as the superuser means
-- they do not depend on pg_trgm being a trusted extension.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
