-- One PostgreSQL, two databases: the MLflow tracking store and registry, and Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
