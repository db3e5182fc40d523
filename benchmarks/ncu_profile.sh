#!/bin/bash
# One device call: Nsight Compute over one SPA op forward per point (benchmarks/profile_ncu.py).
#   POINTS="131072:32:topk32 16384:32:density0.2" PATHS="wide" bash benchmarks/ncu_profile.sh
# Env: POINTS, PATHS (selection paths timed alone too), KERNELS (ncu -k regex, default every kernel),
# SOURCE_K (regex of the kernels whose SASS-level stall samples are dumped). Writes under $OUT:
# prof.ncu-rep, details.txt (every section of every kernel), source.csv.gz (SASS lines with their
# stall samples, SOURCE_K's kernels), summary.csv, ncu.log.
set -o pipefail
OUT=${OUT:-/tmp/spa_ncu}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/spa_cache/triton
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; "$NCU" --version | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
KARGS=(); if [ -n "$KERNELS" ]; then KARGS=(-k "regex:$KERNELS"); fi
PARGS=(); if [ -n "$PATHS" ]; then PARGS=(--paths $PATHS); fi
timeout "${NCU_S:-400}" "$NCU" --clock-control none --profile-from-start off --set full --import-source yes \
    "${KARGS[@]}" -f -o "$OUT/prof" python3 benchmarks/profile_ncu.py $POINTS "${PARGS[@]}" > "$OUT/ncu.log" 2>&1
echo "ncu exit $?"; grep -v "^==PROF==" "$OUT/ncu.log" | tail -20
"$NCU" -i "$OUT/prof.ncu-rep" --page details --print-details all > "$OUT/details.txt" 2>&1
echo "details: $(wc -l < "$OUT/details.txt") lines"
if [ -n "$SOURCE_K" ]; then
  "$NCU" -i "$OUT/prof.ncu-rep" -k "regex:$SOURCE_K" --page source --print-source sass,cuda --csv \
      > "$OUT/source.csv" 2> "$OUT/source.err"
  echo "source: $(wc -l < "$OUT/source.csv") lines"; head -3 "$OUT/source.err"; gzip -f "$OUT/source.csv"
fi
"$NCU" -i "$OUT/prof.ncu-rep" --page raw --csv --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size > "$OUT/summary.csv" 2>&1
cat "$OUT/summary.csv" | cut -c1-400
