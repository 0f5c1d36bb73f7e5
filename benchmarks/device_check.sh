#!/bin/sh
# Every GPU check of the project in one prepared run, for a session that the
# device tool lends a GPU (H100/H200; torch + triton, no vLLM, no network):
#
#   sh benchmarks/device_check.sh            # writes under $OUT (the tool's folder)
#
# 1. the GPU's name, memory and driver;
# 2. benchmarks/kernels/run_all.py: every kernel (Triton, and the CUDA extension
#    built from csrc/) checked against its PyTorch reference and timed against
#    the measured copy bandwidth, Llama-3-8B shapes (about 3-5 minutes);
# 3. benchmarks/bench_method_cost.py --micro-only: the temporal predictor over
#    4k tokens x 8 heads and the semantic grouping of 512 tokens.
#
# At most 7 files come back: gpu.txt, kernels/{table.md,results.json,
# fraction_of_copy.png}, kernels.log, micro.json, micro.log.  The exit status
# is run_all's (1 when a check failed).  DEVICE_CHECK_SMOKE=1 runs the same
# steps on a CPU in Triton's interpreter (what the tests do).
set -u
OUT=${OUT:-results/device}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/kernels"
export PYTHONUNBUFFERED=1
if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  SMOKE=--smoke
  echo "no GPU: smoke mode" > "$OUT/gpu.txt"
else
  SMOKE=
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv > "$OUT/gpu.txt" 2>&1
fi
cat "$OUT/gpu.txt"
$PY "$HERE/kernels/run_all.py" $SMOKE --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
status=$?
tail -n 40 "$OUT/kernels.log"
$PY "$HERE/bench_method_cost.py" --micro-only --json "$OUT/micro.json" > "$OUT/micro.log" 2>&1 \
  || status=1
cat "$OUT/micro.log"
exit $status
