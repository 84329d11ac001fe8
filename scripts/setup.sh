#!/usr/bin/env bash
# Prepare this machine for Ratchet. Idempotent: safe to re-run, fast when nothing changed.
#
#   1. Debian packages: docker.io runsc debootstrap ca-certificates python3-venv git chromium prometheus
#      (optional: wrk, docker-compose), apt-get update only when something is missing
#   2. /etc/docker/daemon.json: "live-restore": true and the gVisor runtime `runsc`
#      (other keys are kept); a running engine is told to reload it
#   3. the Docker engine: started if it is not answering, waited for (60 s)
#   4. .venv: the locked dependency set (requirements/dev.txt, hashes checked), then the
#      project itself installed editable
#   5. images/build.sh (ratchet/sandbox:latest, ratchet/service:latest, ratchet/torch:latest: the
#      tests run examples/gpt in it; its torch is the CPU build unless a GPU is there, see
#      RATCHET_TORCH_FLAVOUR in images/build.sh)
#
# Usage: scripts/setup.sh [--no-images]
# Environment: PYTHON (interpreter for .venv, default python3), RATCHET_LOCAL_BASE (see
# images/build.sh), RATCHET_DAEMON_JSON (default /etc/docker/daemon.json).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
DAEMON_JSON="${RATCHET_DAEMON_JSON:-/etc/docker/daemon.json}"
DOCKERD_LOG=/var/log/ratchet-dockerd.log
build_images=1
for arg in "$@"; do
  case "$arg" in
    --no-images) build_images=0 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
T0=$(date +%s)

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root for: $*"
  fi
}

# ---------------------------------------------------------------------------
# 1. Packages
# ---------------------------------------------------------------------------
have_pkg() {
  case "$1" in
    docker.io) command -v dockerd >/dev/null && command -v docker >/dev/null ;;
    runsc) command -v runsc >/dev/null ;;
    debootstrap) command -v debootstrap >/dev/null ;;
    ca-certificates) [ -s /etc/ssl/certs/ca-certificates.crt ] ;;
    python3-venv) command -v "$PYTHON" >/dev/null && "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ;;
    git) command -v git >/dev/null ;;
    chromium) [ -x /usr/bin/chromium ] ;;
    prometheus) command -v prometheus >/dev/null && command -v promtool >/dev/null ;;
    wrk) command -v wrk >/dev/null ;;
    docker-compose) command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 ;;
    *) dpkg -s "$1" >/dev/null 2>&1 ;;
  esac
}

# chromium: the browser tests; prometheus: the tests start their own server from it (the
# package's own service is not used)
REQUIRED=(docker.io runsc debootstrap ca-certificates python3-venv git chromium prometheus)
OPTIONAL=(wrk docker-compose)
missing=()
for p in "${REQUIRED[@]}"; do have_pkg "$p" || missing+=("$p"); done
missing_optional=()
for p in "${OPTIONAL[@]}"; do have_pkg "$p" || missing_optional+=("$p"); done

if [ "$(id -u)" = 0 ]; then APT_LOG=/var/log/ratchet-apt.log; else APT_LOG=/tmp/ratchet-apt.log; fi
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confold "$@" >>"$APT_LOG" 2>&1
}

if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing: ${missing[*]} (and no apt-get to install them)"
  log "installing ${missing[*]}${missing_optional[*]:+ (optional: ${missing_optional[*]})}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$APT_LOG" 2>&1 \
    || die "apt-get update failed (see $APT_LOG)"
  apt_install "${missing[@]}" || die "apt-get install failed (see $APT_LOG)"
  for p in "${missing_optional[@]}"; do
    apt_install "$p" || warn "optional package $p could not be installed"
  done
  for p in "${missing[@]}"; do
    have_pkg "$p" && continue
    [ "$p" = python3-venv ] && die "$PYTHON cannot create venvs (set PYTHON=/usr/bin/python3?)"
    die "$p still missing after apt-get install"
  done
elif [ ${#missing_optional[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  # Only optional packages are missing: try from the current package lists, no update.
  for p in "${missing_optional[@]}"; do
    if apt_install "$p"; then log "installed $p"; else warn "optional package $p not installed"; fi
  done
else
  log "packages present"
fi

# ---------------------------------------------------------------------------
# 2. Engine configuration
# ---------------------------------------------------------------------------
RUNSC=$(command -v runsc || echo /usr/bin/runsc)
as_root mkdir -p "$(dirname "$DAEMON_JSON")"
daemon_json_changed=$(as_root "$PYTHON" - "$DAEMON_JSON" "$RUNSC" <<'PY'
import json, os, sys

path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cfg = json.loads(text) if text.strip() else {}
except FileNotFoundError:
    cfg = {}
except ValueError as exc:
    sys.exit(f"{path} is not valid JSON ({exc}); fix it by hand")
if not isinstance(cfg, dict):
    sys.exit(f"{path} does not hold a JSON object; fix it by hand")
before = json.dumps(cfg, sort_keys=True)

cfg["live-restore"] = True
runtimes = cfg.setdefault("runtimes", {})
entry = runtimes.get("runsc") if isinstance(runtimes.get("runsc"), dict) else {}
entry["path"] = runsc
args = [a for a in entry.get("runtimeArgs", []) if not a.startswith("--network")]
entry["runtimeArgs"] = [*args, "--network=none"]
runtimes["runsc"] = entry

if json.dumps(cfg, sort_keys=True) == before:
    print("no")
    sys.exit(0)
tmp = path + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print("yes")
PY
) || die "could not update $DAEMON_JSON"

# ---------------------------------------------------------------------------
# 3. Engine
# ---------------------------------------------------------------------------
dockerd_pid() {
  local pid
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -qs dockerd "/proc/$pid/comm"; then
    echo "$pid"; return 0
  fi
  pidof dockerd 2>/dev/null || pgrep -x dockerd 2>/dev/null
}

wait_for_engine() {
  local i
  for i in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}

if docker info >/dev/null 2>&1; then
  if [ "$daemon_json_changed" = yes ]; then
    log "reloading the engine configuration ($DAEMON_JSON changed)"
    if pid=$(dockerd_pid); then
      as_root kill -HUP "$pid"
    else
      warn "dockerd is not local; restart the engine to apply $DAEMON_JSON"
    fi
  else
    log "engine running"
  fi
else
  if dockerd_pid >/dev/null; then
    log "waiting for the engine (dockerd is starting)"
  elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null \
       && systemctl cat docker.service >/dev/null 2>&1; then
    log "starting the engine (systemctl start docker)"
    as_root systemctl start docker
  else
    log "starting the engine (dockerd, log: $DOCKERD_LOG)"
    as_root sh -c "setsid dockerd >>'$DOCKERD_LOG' 2>&1 </dev/null &"
  fi
  if ! wait_for_engine; then
    tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
    die "the engine did not come up within 60 s"
  fi
fi
# The runtime registration is what tests and `--runtime runsc` rely on; check it took.
for i in $(seq 1 10); do
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && break
  [ "$i" = 10 ] && warn "the engine does not list the runsc runtime yet"
  sleep 0.5
done

# ---------------------------------------------------------------------------
# 4. Development environment
# ---------------------------------------------------------------------------
venv_stamp() {
  { sha256sum pyproject.toml requirements/dev.txt | cut -d' ' -f1; .venv/bin/python -c 'import sys; print(sys.version)'; } 2>/dev/null
}
if ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  log "creating .venv ($("$PYTHON" --version 2>&1))"
  rm -rf .venv
  "$PYTHON" -m venv .venv || die "cannot create .venv with $PYTHON"
fi
if [ "$(cat .venv/.ratchet-setup 2>/dev/null)" != "$(venv_stamp)" ] \
   || [ ! -x .venv/bin/ratchet ] || [ ! -x .venv/bin/pytest ] || [ ! -x .venv/bin/ruff ]; then
  # Exact versions with hashes from the lock (scripts/lock.sh refreshes it); the project itself
  # is then installed editable without build isolation, so nothing unpinned is fetched.
  log "installing the locked dependencies (requirements/dev.txt) into .venv"
  { .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/dev.txt \
      && .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . \
      && .venv/bin/python -m pip check; } >.venv/ratchet-pip-install.log 2>&1 || {
    cat .venv/ratchet-pip-install.log >&2
    die "installing into .venv failed (log above)"
  }
  venv_stamp >.venv/.ratchet-setup
else
  log ".venv up to date"
fi

# ---------------------------------------------------------------------------
# 5. Images
# ---------------------------------------------------------------------------
if [ "$build_images" = 1 ]; then
  bash images/build.sh sandbox service torch
fi

log "setup done in $(( $(date +%s) - T0 ))s"
