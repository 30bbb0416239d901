#!/usr/bin/env bash
# Team MLflow tracking server: PostgreSQL backend + S3 artifact store (artifacts proxied through the server,
# so clients need no S3 credentials). Secrets come from the environment only, never from files in this repo:
#   export MLFLOW_DB_PASSWORD=...  MLFLOW_ARTIFACTS=s3://your-bucket/mlflow  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   infra/mlflow-team.sh
# Binds 127.0.0.1 unless MLFLOW_HOST says otherwise (put it behind your SSO proxy / VPN to share it).
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://your-bucket/mlflow}"
db_user=${MLFLOW_DB_USER:-mlflow}
db_host=${MLFLOW_DB_HOST:-127.0.0.1}
db_name=${MLFLOW_DB_NAME:-mlflow}
# Passed through the environment, not the command line, so the password never shows in `ps`.
export MLFLOW_BACKEND_STORE_URI="postgresql://${db_user}:${MLFLOW_DB_PASSWORD}@${db_host}:5432/${db_name}"
# MLflow 3's job executor (huey consumer processes for GenAI evaluation and trace rollups): off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec mlflow server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --workers "${MLFLOW_WORKERS:-4}"
