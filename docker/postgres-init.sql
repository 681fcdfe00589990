-- Runs once, when the postgres service starts on an empty data volume
-- (/docker-entrypoint-initdb.d/, as $POSTGRES_USER, a superuser, through psql).
-- One database per concern: the Prefect server's, the MLflow tracking store and registry,
-- and a warehouse for your own tables (a spec's `warehouse.url`).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE warehouse;
REVOKE ALL ON DATABASE prefect, mlflow FROM PUBLIC;
REVOKE TEMPORARY ON DATABASE warehouse FROM PUBLIC;

-- The agents' login for the warehouse, as agents/pg_reader_role.py wants it: not a superuser
-- (a superuser login could switch out of the reader role), able only to become
-- posttrain_reader, the SELECT-only role the SQL tool runs every query as. The column grants
-- follow the spec's allow-list once your tables exist: the tool prints the exact GRANTs
-- for the tables' owner when they are missing. Password from the environment
-- (docker/compose.yml passes WAREHOUSE_AGENT_PASSWORD).
\getenv warehouse_agent_password WAREHOUSE_AGENT_PASSWORD
CREATE ROLE posttrain_reader NOLOGIN NOINHERIT;
CREATE ROLE posttrain_agent LOGIN NOINHERIT PASSWORD :'warehouse_agent_password';
GRANT posttrain_reader TO posttrain_agent;

\connect warehouse
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO posttrain_reader;
