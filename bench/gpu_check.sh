#!/usr/bin/env bash
# The one-shot GPU check (bench/gpu_check.py): correctness of the fused steps on CUDA, then the
# step-time report, each row in its own process, the JSON and Markdown rewritten after every row.
#
#   bash bench/gpu_check.sh                 # on the GPU machine; under 8 minutes on an H100/H200
#   bash bench/gpu_check.sh --dry-run       # the same machinery on the CPU (tiny shapes, interpreted kernels)
#   bash bench/gpu_check.sh --only LAMB     # only the jobs whose name contains LAMB (repeatable)
#
# Results: $OUT/gpu_check.{json,md} and $OUT/logs/ when $OUT is set (as on the device machine),
# else gpu_check_out/. Exit status 1 when any row failed. PYTHON picks the interpreter.
#
# bench/.deps (git-ignored), when present, is put on the path after the checkout: packages for a
# machine without network, e.g. `pip install --no-deps --target bench/.deps timm` beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="$PWD/bench/.deps"
if [ -d "$DEPS" ]; then
  export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "${PYTHON:-python}" -m bench.gpu_check --out "${OUT:-gpu_check_out}" "$@"
