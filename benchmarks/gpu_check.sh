#!/bin/bash
# One device call (<= 600 s): GPU tests of the SPA kernels (71 tests: 55 took 290 s on an H200 in session 15,
# the Gluon variants compile one kernel each), then the full grid of benchmarks/bench_kernels.py (24 points, key
# points first) in the time left.
#   run: bash benchmarks/gpu_check.sh   (writes logs and JSON under $OUT)
# Env: TOTAL_S (whole script, default 570), TEST_S (test limit, default 420; 0 skips the tests),
# TEST_K (a pytest -k expression: only those GPU tests; default all of tests/test_kernels.py, tests/test_fine_selection.py
# and tests/test_gluon_forward.py),
# BENCH_S (bench limit; default: what TOTAL_S leaves after the tests), BENCH_ARGS (extra
# arguments), CACHE_IN (a caches.tgz from an earlier call: Triton/Inductor compile caches and the
# tuning cache, to skip recompiling), SPA_TUNE_IGNORE_SHIPPED=1 (retune every kernel instead of
# using spa_compile/codegen/tuned/*.json; the forward is retuned anyway, its key is versioned),
# CM_S (seconds for benchmarks/bench_cost_model.py --refit between the tests and the grid; 0 = skip),
# SEL_S (seconds for benchmarks/bench_selection.py before it, SEL_ARGS its arguments; 0 = skip),
# FWDCFG_S (seconds for benchmarks/bench_forward_configs.py before the grid, FWDCFG_ARGS its arguments; 0 = skip),
# GLUON_S (seconds for benchmarks/bench_gluon_forward.py after the tests, GLUON_ARGS its arguments;
# 0 = skip): first each of GLUON_VARIANTS' GPU tests (a pytest -k word each, default the order
# variants ns3qo ns2qo ns6qgo) under its own 120 s limit (a new barrier scheme that hangs costs
# 120 s, not the call; TEST_K="not <word>" keeps such a variant out of the test stage).
# Everything is written under $OUT/run and packed at the end into $OUT/gpu_run.tgz (the device tool
# brings back at most 8 files), with the result JSONs and caches.tgz beside it.
set -o pipefail
FINAL=${OUT:-/tmp/spa_out}
OUT=$FINAL/run
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/spa_cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/spa_cache/inductor
export SPA_TUNE_CACHE=/tmp/spa_cache/tune.json SPA_TUNE_LOG=$OUT/tune_log.jsonl
mkdir -p /tmp/spa_cache
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
if [ -n "$CACHE_IN" ] && [ -f "$CACHE_IN" ]; then tar xzf "$CACHE_IN" -C /tmp/spa_cache && echo "caches restored"; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv 2>&1 | tee "$OUT/smi.txt"
# the card's clock, power and temperature every 500 ms through the whole call (smi_log.csv)
( nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
      --format=csv -lms 500 > "$OUT/smi_log.csv" 2>&1 || nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
      --format=csv -lms 500 > "$OUT/smi_log.csv" 2>&1 ) &
SMI_PID=$!
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ "${TEST_S:-420}" != "0" ]; then
  # SPA_AUTOTUNE=0: first candidates; test_gpu_kernel_writes_every_output launches every forward
  # candidate (their compiled kernels stay in TRITON_CACHE_DIR for the benchmark's tuning)
  # one argument, spaces and all
  KARGS=(); if [ -n "$TEST_K" ]; then KARGS=(-k "$TEST_K"); fi
  SPA_AUTOTUNE=0 timeout "${TEST_S:-420}" python3 -m pytest -m gpu tests/test_kernels.py tests/test_fine_selection.py tests/test_gluon_forward.py -q -x -p no:cacheprovider \
      --durations=5 "${KARGS[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
  echo "gpu tests exit $? after $(( $(date +%s) - T0 )) s"
fi
if [ "${GLUON_S:-0}" != "0" ]; then
  for var in ${GLUON_VARIANTS:-ns3qo ns2qo ns6qgo}; do
    timeout 120 python3 -m pytest -m gpu tests/test_gluon_forward.py -q -x -p no:cacheprovider -k "$var" \
        >> "$OUT/gluon_tests.log" 2>&1
    echo "gluon tests $var exit $? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/gluon_tests.log"
  done
  timeout "$GLUON_S" python3 benchmarks/bench_gluon_forward.py --out "$OUT/gluon.json" ${GLUON_ARGS} > "$OUT/gluon.log" 2>&1
  echo "gluon bench exit $? after $(( $(date +%s) - T0 )) s"; cut -c1-300 "$OUT/gluon.log"
fi
if [ "${SEL_S:-0}" != "0" ]; then
  # the selection stage: event vs CUDA-graph time, paths and k-th search variants, the op's kernels
  timeout "$SEL_S" python3 benchmarks/bench_selection.py --out "$OUT/selection.json" ${SEL_ARGS} > "$OUT/selection.log" 2>&1
  echo "selection bench exit $? after $(( $(date +%s) - T0 )) s"; grep -v "^    " "$OUT/selection.log" | cut -c1-600
fi
if [ "${FWDCFG_S:-0}" != "0" ]; then
  # launch configs / kernel switches against the tuned forward (FWDCFG_ARGS: bench_forward_configs.py's arguments)
  timeout "$FWDCFG_S" python3 benchmarks/bench_forward_configs.py --out "$OUT/fwd_configs.json" ${FWDCFG_ARGS} > "$OUT/fwd_configs.log" 2>&1
  echo "forward configs exit $? after $(( $(date +%s) - T0 )) s"; cut -c1-400 "$OUT/fwd_configs.log"
fi
if [ "${CM_S:-0}" != "0" ]; then
  timeout "$CM_S" python3 benchmarks/bench_cost_model.py --out "$OUT/cm" --refit > "$OUT/cost_model.log" 2>&1
  echo "cost model exit $? after $(( $(date +%s) - T0 )) s"; grep -A7 "^== " "$OUT/cost_model.log" | head -40
fi
LEFT=$(( TOTAL_S - ($(date +%s) - T0) - 15 ))
BENCH_S=${BENCH_S:-$LEFT}
if [ "$BENCH_S" -gt 60 ]; then
  # stop starting points 45 s before the limit (the longest point, 128K density 0.2, ~30 s)
  timeout "$BENCH_S" python3 benchmarks/bench_kernels.py --out "$OUT" --budget-s $(( BENCH_S - 45 )) \
      ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
  echo "bench exit $? after $(( $(date +%s) - T0 )) s"
else
  echo "no time left for the benchmark ($BENCH_S s)"
fi
kill "$SMI_PID" 2>/dev/null; pkill -f "nvidia-smi --query-gpu=timestamp" 2>/dev/null
cp /tmp/spa_cache/tune.json "$OUT/tune.json" 2>/dev/null
tar czf "$OUT/caches.tgz" -C /tmp/spa_cache . 2>/dev/null
SZ=$(stat -c %s "$OUT/caches.tgz" 2>/dev/null || echo 0)
if [ "$SZ" -gt 15000000 ]; then tar czf "$OUT/caches.tgz" -C /tmp/spa_cache triton tune.json 2>/dev/null; fi
mv "$OUT/caches.tgz" "$FINAL/" 2>/dev/null
cp "$OUT"/*.json "$OUT"/cm/*.json "$FINAL/" 2>/dev/null
tar czf "$FINAL/gpu_run.tgz" -C "$OUT" .
ls -la "$FINAL"
