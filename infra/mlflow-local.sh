#!/usr/bin/env bash
# One-machine MLflow tracking server: SQLite backend + local artifact store, bound to loopback.
#   infra/mlflow-local.sh [STORE_DIR]            (default ./mlruns, the same store the jobs use when no server runs)
#   MLFLOW_HOST=0.0.0.0 infra/mlflow-local.sh    only if you really want it reachable from other machines
# Then point jobs at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
store=$(cd "$(dirname "${1:-mlruns}")" && pwd)/$(basename "${1:-mlruns}")
mkdir -p "$store/artifacts"
# `make` installs mlflow into the repository's .venv: use that one when no environment with mlflow is active.
mlflow_bin=$(command -v mlflow || true)
repo_venv_mlflow="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlflow"
if [[ -z "$mlflow_bin" && -x "$repo_venv_mlflow" ]]; then mlflow_bin=$repo_venv_mlflow; fi
if [[ -z "$mlflow_bin" ]]; then
  echo "mlflow-local.sh: no 'mlflow' on PATH and no $repo_venv_mlflow; run 'make env' first" >&2
  exit 1
fi
# MLflow 3's server also runs a job executor (a pool of huey consumer processes for GenAI evaluation and trace
# rollups) that a tracking server for training runs never uses: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "$mlflow_bin" server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --workers "${MLFLOW_WORKERS:-2}"
