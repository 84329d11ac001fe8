#!/usr/bin/env bash
# Refresh the locked dependency set on purpose, then test against it.
#
#   requirements/service.txt  what the service needs at run time (the service image installs it)
#   requirements/dev.txt      that, plus the [test] and [ray] extras and the build backend (.venv and CI)
#   requirements/ray.txt      the service with the [ray] extra: what every Ray node runs, and the
#                             service image built with `images/build.sh --with-ray`
#   requirements/build.txt    the build backend alone (images/build.sh builds the service wheel)
#
# Both are resolved from pyproject.toml's ranges for every platform and Python >= 3.11, with the
# hashes of every file, so `pip install --require-hashes` installs exactly what was tested. The
# ranges in pyproject.toml stay for people who install the package into their own environment;
# nothing else reads them. Versions already in the lock are kept unless asked otherwise.
#
# Usage: scripts/lock.sh [--upgrade | --upgrade-package NAME ...] [--no-test]
#   --upgrade                  move every package to the newest release the ranges allow
#   --upgrade-package NAME     move only NAME (repeatable)
#   --no-test                  only rewrite the lock files
# An upgrade is a commit of its own: the lock files together with whatever the tests needed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

UV_VERSION=0.13.9   # the resolver; a newer one may write the files differently
PYTHON="${PYTHON:-python3}"
upgrade=()
run_tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade) upgrade+=(--upgrade) ;;
    --upgrade-package) shift; upgrade+=(--upgrade-package "${1:?--upgrade-package needs a name}") ;;
    --no-test) run_tests=0 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

tool_venv="${XDG_CACHE_HOME:-$HOME/.cache}/ratchet/uv-$UV_VERSION"
if [ ! -x "$tool_venv/bin/uv" ]; then
  echo "==> installing uv $UV_VERSION into $tool_venv"
  rm -rf "$tool_venv"
  "$PYTHON" -m venv "$tool_venv"
  "$tool_venv/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
uv="$tool_venv/bin/uv"

# uv reads no pip configuration: it resolves against the public index. Behind a TLS-intercepting
# proxy it must trust the system's certificates.
export UV_NATIVE_TLS=1
common=(--universal --python-version 3.11 --generate-hashes --no-header --quiet "${upgrade[@]}")

echo "==> requirements/service.txt"
"$uv" pip compile pyproject.toml "${common[@]}" -o requirements/service.txt
echo "==> requirements/dev.txt"
# Constrained to the service lock, so a package both use has one version everywhere.
"$uv" pip compile pyproject.toml requirements/build.in --extra test --extra ray -c requirements/service.txt \
  "${common[@]}" -o requirements/dev.txt
echo "==> requirements/ray.txt"
"$uv" pip compile pyproject.toml --extra ray -c requirements/dev.txt "${common[@]}" -o requirements/ray.txt
echo "==> requirements/build.txt"
"$uv" pip compile requirements/build.in -c requirements/dev.txt "${common[@]}" -o requirements/build.txt

git --no-pager diff --stat -- requirements/ || true
if [ "$run_tests" = 1 ]; then
  echo "==> testing against the lock"
  exec bash scripts/test.sh
fi
