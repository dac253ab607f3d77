"""Every environment variable mmops reads, and those its libraries read in a deployment.

Endpoints and secrets live in the environment, never in params.yaml or code. `VARIABLES` is the
list of what mmops itself reads (a test checks the code reads no other); `LIBRARY_VARIABLES` are
read by MLflow, Prefect, boto3/DVC or torchrun, and set by the deployment files in `infra/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

VARIABLES: dict[str, str] = {
    "MLFLOW_TRACKING_URI": (
        "MLflow tracking server and registry; default: a SQLite store `mlflow.db` in the "
        "working directory"
    ),
    "KAFKA_BOOTSTRAP_SERVERS": "comma-separated Kafka brokers; default 127.0.0.1:9092",
    "KAFKA_CLIENT_ID": "client id the consumer and producers report; default mmops",
    "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    "KAFKA_SASL_MECHANISM": "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI",
    "KAFKA_SASL_USERNAME": "SASL user",
    "KAFKA_SASL_PASSWORD": "SASL password (a secret)",
    "KAFKA_SSL_CAFILE": "CA bundle that signed the brokers' certificates",
    "KAFKA_SSL_CERTFILE": "client certificate, for mutual TLS",
    "KAFKA_SSL_KEYFILE": "client key, for mutual TLS",
    "KAFKA_SSL_PASSWORD": "password of the client key (a secret)",
    "MMOPS_USER": "who promotes or rolls back, recorded on the model version; default: OS user",
    "MMOPS_GIT_COMMIT": (
        "the commit recorded with a model when the code runs outside a git checkout (set by the "
        "images' GIT_COMMIT build argument)"
    ),
    "MMOPS_DEBUG": "1: commands show the full traceback of an error, like `mmops -v`",
    "MMOPS_LOCK_DIR": "folder of the host-wide registry lock files; default: the temp folder",
    "WORLD_SIZE": "set by torchrun: processes in the training job",
    "RANK": "set by torchrun: this process's rank",
    "LOCAL_RANK": "set by torchrun: this process's GPU on its node",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": (
        "`mmops retrain` without PREFECT_API_URL: how long to wait for the temporary Prefect API"
    ),
}

LIBRARY_VARIABLES: dict[str, str] = {
    "MLFLOW_TRACKING_USERNAME": "MLflow server basic-auth user",
    "MLFLOW_TRACKING_PASSWORD": "MLflow server basic-auth password (a secret)",
    "MLFLOW_S3_ENDPOINT_URL": "S3-compatible endpoint (MinIO) of the MLflow artifact store",
    "AWS_ACCESS_KEY_ID": "S3 credentials: MLflow artifacts and the DVC remote",
    "AWS_SECRET_ACCESS_KEY": "S3 credentials (a secret)",
    "AWS_DEFAULT_REGION": "S3 region",
    "AWS_ENDPOINT_URL": "S3-compatible endpoint (MinIO) for DVC's S3 remote",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": (
        "seconds per HTTP request to the tracking server; unset: tracking.request_timeout_s"
    ),
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "retries of a failed request; unset: tracking.max_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": (
        "seconds of backoff between retries (int); unset: tracking.backoff_factor"
    ),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": (
        "random seconds added to each backoff; unset: tracking.backoff_jitter"
    ),
    "MLFLOW_RUN_CONTEXT": (
        "JSON tags MLflow puts on each new run; mmops adds its host and pid (`mmops doctor`)"
    ),
    "PREFECT_API_URL": "Prefect server API; unset: a temporary local API per flow run",
    "PREFECT_API_REQUEST_TIMEOUT": (
        "seconds per request to the Prefect API (Prefect's default 60), read when prefect loads"
    ),
    "PREFECT_CLIENT_MAX_RETRIES": "retries of a failed Prefect API request (Prefect's default 5)",
    "PREFECT_API_KEY": "Prefect Cloud API key (a secret)",
    "PREFECT_API_DATABASE_CONNECTION_URL": "Prefect server database (PostgreSQL in production)",
    "PREFECT_SERVER_API_HOST": "address the Prefect server listens on",
    "PREFECT_UI_API_URL": "Prefect API address the browser UI calls",
    "MMOPS_GIT_REPOSITORY": "git URL the Prefect deployment clones (infra/prefect/prefect.yaml)",
    "MASTER_ADDR": "torchrun rendezvous host (set by torchrun or the training Job)",
    "MASTER_PORT": "torchrun rendezvous port",
    "NCCL_DEBUG": "NCCL logging, for multi-GPU debugging",
    "MLFLOW_AUTH_CONFIG_PATH": (
        "MLflow server: its basic-auth settings file (`infra/mlflow/basic_auth.ini`)"
    ),
    "MLFLOW_AUTH_ADMIN_USERNAME": "MLflow server: the basic-auth admin its first start creates",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "MLflow server: that admin's password (a secret)",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": (
        "MLflow server: signs the basic-auth UI's CSRF tokens (a secret)"
    ),
    "PGPASSWORD": "PostgreSQL password libpq reads, so database URIs carry none (a secret)",
    "PREFECT_API_AUTH_STRING": (
        "a self-hosted Prefect server's basic auth, `user:password` (a secret)"
    ),
    "PREFECT_SERVER_API_AUTH_STRING": (
        "Prefect server: the `user:password` its API and UI require (a secret)"
    ),
}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the working directory (a registry needs one)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mlflow_client() -> Any:
    """An MLflow client of the tracking store and registry that `tracking_uri` names."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())
