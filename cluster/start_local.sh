#!/usr/bin/env bash
# A Ray head and an MLflow server on 127.0.0.1, for `ray job submit` from this machine.
# PIDs go to $POUTA_RUN_DIR (default .pouta-local/); stop both with cluster/stop_local.sh.
# Usage: cluster/start_local.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$(realpath -m "${POUTA_RUN_DIR:-.pouta-local}")
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
VENV=${VENV:-.venv}
RAY_CMD=("$VENV/bin/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT"
         --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --block)
# Clients may name this machine (http://$(hostname):5000, as jobs on a cluster would): MLflow
# answers 403 to a Host it does not list (cluster/SECURITY.md); the list replaces its default.
MLFLOW_NAME=${MLFLOW_NAME:-$(hostname)}
MLFLOW_CMD=("$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT"
            --allowed-hosts "$MLFLOW_NAME,$MLFLOW_NAME:$MLFLOW_PORT,localhost:*,127.0.0.1:*"
            --cors-allowed-origins "http://$MLFLOW_NAME:$MLFLOW_PORT"
            --backend-store-uri "sqlite:///$RUN_DIR/mlflow.db" --artifacts-destination "$RUN_DIR/artifacts")
# A closed cluster: token authentication on explicitly (Ray turns it off when no token file
# exists yet), with a token only this user can read. Clients on this machine set
# RAY_AUTH_MODE=token and read the same file.
export RAY_AUTH_MODE=token
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [ "${1:-}" = "--dry-run" ]; then
  echo "RAY_AUTH_MODE=$RAY_AUTH_MODE ${RAY_CMD[*]}"
  echo "${MLFLOW_CMD[*]}"
  exit 0
fi
mkdir -p "$RUN_DIR"
if [ ! -s "$TOKEN_FILE" ]; then
  mkdir -p "$(dirname "$TOKEN_FILE")"
  (umask 077 && "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
  echo "wrote a new Ray auth token to $TOKEN_FILE"
fi
chmod 600 "$TOKEN_FILE"
nohup "${RAY_CMD[@]}" > "$RUN_DIR/ray.log" 2>&1 &
echo $! > "$RUN_DIR/ray.pid"
nohup "${MLFLOW_CMD[@]}" > "$RUN_DIR/mlflow.log" 2>&1 &
echo $! > "$RUN_DIR/mlflow.pid"
echo "Ray dashboard http://127.0.0.1:$DASHBOARD_PORT (pid $(cat "$RUN_DIR/ray.pid"))"
echo "MLflow        http://127.0.0.1:$MLFLOW_PORT (pid $(cat "$RUN_DIR/mlflow.pid"))"
echo "export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
