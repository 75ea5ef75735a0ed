# First call of a crossover run for the INT8 rows (carry .whl, .device/calls and
# .device/trt86-build/prebuilt-cp312): qdiff and the wheels into /tmp/site, the TensorRT bindings
# into /tmp/trt86-py, then the crossover detached with the INT8 engine only, its build gated on
# TensorRT (the parts and finish.sh follow in the next calls) and its timing cache kept.
# $1: the crossover's budget in seconds (what the session's device time allows, minus ~60 s).
# $2: the engines (default int8; int8,w4a8 builds the W4A8 engine after it, one build at a time).
# Timing waits (up to 120 s) for the pids finish.sh writes to /tmp/others.pids (the GPU tests).
mkdir -p /tmp/logs /tmp/xo-cache
[ -d .device/trt86-build/prebuilt-cp312 ] || { echo "carry .device/trt86-build/prebuilt-cp312 (tools/device/README.md says how to build it)"; exit 1; }
source .device/calls/env.sh >/dev/null 2>&1 || { echo "env.sh failed: carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 benchmarks/gemm_anchor.py --out /tmp/logs/anchor > /dev/null 2>&1 &  # seconds, before the export needs the CPU
python3 benchmarks/sd15_crossover.py --work /tmp/sd15 --out /tmp/xo --engines "${2:-int8}" --max-builds 1 \
  --budget-s "${1:?budget seconds}" --bench-reserve-s 120 --opt-level 1 --builds-after /tmp/trt86/READY \
  --timing-cache-dir /tmp/xo-cache \
  --others-pid-file /tmp/others.pids --quiet-wait-s 120 --detach
wait
