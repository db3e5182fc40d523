#!/bin/bash
# One device call: the op-overhead profile, then the long-context study (benchmarks/long_context_accuracy.py).
#   run: bash benchmarks/long_context_gpu.sh      (outputs under $OUT)
# The study resumes from LC_IN (a folder with the model shards and the unpacked lc_small.tgz of an
# earlier call), so a call cut by its time limit loses only the stage in flight.
# Env: OVERHEAD_S (0 skips the profile), LC_S (time limit of the study), LC_ARGS (extra arguments),
# LC_BRING_MODEL=0 (leave the model shards out of $OUT once they are kept here).
set -o pipefail
OUT=${OUT:-/tmp/lc_out}
WORK=${LC_WORK:-/tmp/lc_work}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=. PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ -n "$LC_IN" ] && [ -d "$LC_IN" ]; then cp -r "$LC_IN"/. "$WORK"/ && echo "resuming from $LC_IN"; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv
if [ "${OVERHEAD_S:-75}" != "0" ]; then
  timeout "${OVERHEAD_S:-75}" python3 benchmarks/op_overhead.py --out "$OUT/op_overhead.json" > "$OUT/op_overhead.log" 2>&1
  echo "op_overhead exit $? after $(( $(date +%s) - T0 )) s"; head -c 3000 "$OUT/op_overhead.log"
fi
timeout "${LC_S:-470}" python3 benchmarks/long_context_accuracy.py --work "$WORK" --out "$WORK/long_context.json" \
    --docs "$WORK/docs" ${LC_ARGS} 2>&1 | tee -a "$WORK/long_context.log"
echo "long_context exit $? after $(( $(date +%s) - T0 )) s"
if [ "${LC_BRING_MODEL:-1}" != "0" ]; then cp "$WORK"/model-*.safetensors "$OUT"/ 2>/dev/null; fi
tar czf "$OUT/lc_small.tgz" -C "$WORK" --exclude='model*' .
ls -la "$OUT"
