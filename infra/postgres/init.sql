-- One PostgreSQL, three databases: the MLflow tracking store and registry, MLflow's users and
-- permissions (basic auth), and Prefect's. Runs on the first start of an empty volume only; on an
-- older volume create the new one by hand:
--   docker compose -f infra/docker-compose.yml exec postgres createdb -U mmops mlflow_auth
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
