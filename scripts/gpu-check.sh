#!/usr/bin/env bash
# Train examples/gpt on this machine's GPU without Docker, in under 5 minutes, and print what it
# found: the GPU, tokens per second, start-up (compile) time and val_bpb.
#
#   scripts/gpu-check.sh              # GPU: 120 s budget, bf16 + torch.compile
#   scripts/gpu-check.sh --cpu        # no GPU needed: the tiny CPU configuration, 20 s budget
#   scripts/gpu-check.sh --budget 60  # another training budget (seconds)
#
# Python: $PYTHON if set, else .venv-torch/bin/python, else python3, as long as it imports torch.
# With none of them, --install makes .venv-torch from images/torch/requirements-<cuda|cpu>.lock
# (needs Python 3.11, the lock's target). The dataset is built first when missing
# (examples/gpt/prepare.py; $GPT_DATA_DIR, default ~/.cache/ratchet-gpt).
# Exit status: 0 when the run ended with a finite val_bpb (on a GPU when one was asked for).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

cpu=0
budget=
install=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --budget) budget="$2"; shift ;;
    --install) install=1 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '==> %s\n' "$*"; }
die() { printf 'gpu-check: FAILED: %s\n' "$*" >&2; exit 1; }

gpus=$(nvidia-smi -L 2>/dev/null | grep '^GPU ' || true)
if [ "$cpu" = 0 ] && [ -z "$gpus" ]; then
  die "nvidia-smi lists no GPU (driver missing, or no GPU here); --cpu runs the CPU configuration"
fi
[ -n "$budget" ] || { if [ "$cpu" = 1 ]; then budget=20; else budget=120; fi; }

has_torch() { [ -x "$(command -v "$1" 2>/dev/null)" ] && "$1" -c 'import numpy, torch' 2>/dev/null; }
py=
for candidate in "${PYTHON:-}" "$ROOT/.venv-torch/bin/python" python3; do
  if [ -n "$candidate" ] && has_torch "$candidate"; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
  [ "$install" = 1 ] || die "no Python with torch and numpy found (set PYTHON, or pass --install)"
  flavour=cuda; [ "$cpu" = 1 ] && flavour=cpu
  log "creating .venv-torch from images/torch/requirements-$flavour.lock"
  python3 -m venv .venv-torch
  .venv-torch/bin/python -m pip install -q --require-hashes --no-deps --only-binary=:all: \
    -r "images/torch/requirements-$flavour.lock" || die "installing the $flavour lock failed (it targets Python 3.11)"
  py="$ROOT/.venv-torch/bin/python"
fi
# train.py runs from its own directory: a relative path must keep working there (no symlink is
# resolved: a venv's python is one).
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
log "python: $py ($("$py" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")'))"
if [ "$cpu" = 0 ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  die "nvidia-smi sees $(echo "$gpus" | wc -l) GPU(s) but this torch cannot use them" \
      "($("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')): a CPU build, or a driver older than its CUDA"
fi

"$py" examples/gpt/prepare.py

log "training examples/gpt for ${budget}s on $([ "$cpu" = 1 ] && echo "the CPU" || echo "$(echo "$gpus" | head -n1)")"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
T0=$(date +%s)
env_cpu=()
[ "$cpu" = 1 ] && env_cpu=(CUDA_VISIBLE_DEVICES=)
(cd examples/gpt && env "${env_cpu[@]}" RATCHET_TIME_BUDGET_S="$budget" timeout $((budget + 240)) "$py" train.py) 2>&1 | tee "$out" \
  || die "train.py failed or ran over $((budget + 240))s (output above)"
wall=$(( $(date +%s) - T0 ))

value() { awk -v k="$1:" '$1 == k { v = $2 } END { print v }' "$out"; }
bpb=$(value val_bpb)
"$py" -c "import math, sys; sys.exit(not math.isfinite(float('$bpb')))" 2>/dev/null || die "val_bpb is '$bpb', not a finite number"
echo
echo "gpu-check: $(value device) | ${gpus:+$(echo "$gpus" | head -n1 | sed 's/ (UUID.*//') | }tokens/s $(value tokens_per_second)" \
     "| val_bpb $bpb | start-up (incl. compile) $(value startup_seconds)s | steps $(value num_steps)" \
     "| peak memory $(value peak_vram_mb) MB | wall ${wall}s"
