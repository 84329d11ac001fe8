#!/usr/bin/env bash
# Run the bundled example end to end on this machine:
#   set up (scripts/setup.sh), start `ratchet serve` on 127.0.0.1, wait until it is ready,
#   run examples/demo.py against it (creates the charlm loop, submits candidate edits,
#   waits, prints results.tsv), then stop the service.
#
# Usage: scripts/demo.sh [--keep-running] [examples/demo.py options, e.g. --budget 10]
#   --keep-running   leave the service running afterwards and print its URL
# Environment: RATCHET_PORT (default 8080), RATCHET_DATA_DIR (default ./data); the service
# log goes to $RATCHET_DATA_DIR/ratchet-serve.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

keep=0
demo_args=()
for arg in "$@"; do
  case "$arg" in
    --keep-running) keep=1 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) demo_args+=("$arg") ;;
  esac
done

PORT="${RATCHET_PORT:-8080}"
DATA_DIR="${RATCHET_DATA_DIR:-./data}"
URL="http://127.0.0.1:$PORT"

bash scripts/setup.sh

probe() {  # probe PATH -> exit 0 when the service answers 200
  .venv/bin/python - "$URL$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

if probe /healthz; then
  echo "error: something already answers on $URL; set RATCHET_PORT to a free port" >&2
  exit 1
fi

mkdir -p "$DATA_DIR"
LOG="$DATA_DIR/ratchet-serve.log"
echo "==> starting ratchet serve on $URL (data: $DATA_DIR, log: $LOG)"
nohup .venv/bin/ratchet serve --host 127.0.0.1 --port "$PORT" --data-dir "$DATA_DIR" --slots 2 \
  </dev/null >>"$LOG" 2>&1 &
server_pid=$!

stop_server() {
  kill -0 "$server_pid" 2>/dev/null || return 0
  echo "==> stopping ratchet serve (pid $server_pid)"
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$server_pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$server_pid" 2>/dev/null || true
}
on_exit() {
  if [ "$keep" = 1 ] && kill -0 "$server_pid" 2>/dev/null; then
    echo "==> Ratchet is running at $URL (pid $server_pid, log $LOG); stop it with: kill $server_pid"
  else
    stop_server
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

echo "==> waiting for $URL/readyz"
ready=0
for _ in $(seq 1 120); do
  if probe /readyz; then ready=1; break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ "$ready" != 1 ]; then
  echo "error: the service did not become ready; last lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2 || true
  keep=0
  exit 1
fi

echo "==> running examples/demo.py"
.venv/bin/python examples/demo.py --url "$URL" "${demo_args[@]}"
