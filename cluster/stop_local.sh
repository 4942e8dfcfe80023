#!/usr/bin/env bash
# Stop what cluster/start_local.sh started, by the PIDs it wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${POUTA_RUN_DIR:-.pouta-local}
for name in mlflow ray; do
  pidfile="$RUN_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null && echo "stopped $name ($pid)"
  rm -f "$pidfile"
done
