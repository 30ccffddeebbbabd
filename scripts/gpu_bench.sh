#!/usr/bin/env bash
# One GPU call for a model table: `bevdeploy bench --model $MODEL --precisions $PRECISIONS` (results
# under bench/results/<gpu>/, copied to $OUT with the log). Needs nuscenes-devkit on the GPU machine:
# carry the wheels in .whl (see the device README); they are installed into /tmp/site here.
# Env: MODEL, PRECISIONS, DATA (synthetic:16), CALIB (synthetic:8), APPEND=1 (keep earlier rows),
#      BENCH_TIMEOUT (seconds; the file is rewritten after every row, so a cut run keeps its rows),
#      EXTRA (more bench flags, e.g. "--fused-epilogues --results-name bevformer-small-fused").
# The results files this call wrote are copied to $OUT/results (save_results); the tuning cache to $OUT.
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
: "${MODEL:?set MODEL}"
PRECISIONS=${PRECISIONS:-pytorch fp32 fp16 fp16x2 int8 int8-fp16 int8-fp16x2}
timeout "${BENCH_TIMEOUT:-500}" python3 -m bevdeploy.cli bench --model "$MODEL" --precisions $PRECISIONS \
  --data "${DATA:-synthetic:16}" --calib "${CALIB:-synthetic:8}" ${APPEND:+--append} ${EXTRA:-} > "$OUT/bench_$MODEL.txt" 2>&1
echo "bench rc=$?"
grep -v "it/s\]\|s/it\]\|^\s*$" "$OUT/bench_$MODEL.txt" | grep -E "FPS|Error|error|Traceback|rc=" | tail -20
tail -3 "$OUT/bench_$MODEL.txt"
save_results
