#!/usr/bin/env bash
# One-machine MLflow tracking server: SQLite backend + local artifact store, bound to loopback.
#   infra/mlflow-local.sh [STORE_DIR]            (default ./mlruns, the same store the jobs use when no server runs)
#   MLFLOW_HOST=0.0.0.0 infra/mlflow-local.sh    only if you really want it reachable from other machines
# Then point jobs at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
store=$(cd "$(dirname "${1:-mlruns}")" && pwd)/$(basename "${1:-mlruns}")
mkdir -p "$store/artifacts"
exec mlflow server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --workers "${MLFLOW_WORKERS:-2}"
