#!/usr/bin/env bash
# Accuracy of every precision on trained weights, in one or two GPU calls (10-min cap each):
#   scripts/gpu_accuracy.sh MODEL              both stages (render + train, then build + score)
#   STAGE=train scripts/gpu_accuracy.sh MODEL  first call: render both worlds, train (<= ~6 min on an H100)
#   STAGE=eval  scripts/gpu_accuracy.sh MODEL  second call on the SAME warm machine: build engines, score
# Results: bench/results/<gpu>/accuracy-MODEL.{json,md} (also copied to $OUT with the log).
# Work files (worlds, checkpoint, engines) in $BEVACC_WORK (default /tmp/bevacc) survive between calls
# on a warm machine. Env knobs (python -m bevdeploy.eval.accuracy --help): BEVACC_TRAIN_SECONDS (300:
# training budget, the schedule is fitted into it), BEVACC_STEPS (4000: at most), BEVACC_BATCH,
# BEVACC_LR, BEVACC_TRAIN_DATA (synthetic:600@1), BEVACC_EVAL_DATA (synthetic:120@2), BEVACC_CALIB,
# BEVACC_QAT_STEPS (0: no QAT row), PRECISIONS, KEEP_ROWS=1 (an eval split over calls keeps the
# earlier rows of the same checkpoint), EXTRA (more flags). Needs nuscenes-devkit: carry the
# wheels in .whl (see scripts/gpu_bench.sh); they are installed into /tmp/site here.
set -uo pipefail
MODEL=${1:?usage: scripts/gpu_accuracy.sh MODEL}
NEEDS="nuscenes"; source scripts/device_prologue.sh
PRECISIONS=${PRECISIONS:-fp32 fp16 fp16x2 int8 int8-fp16}
LOG="$OUT/accuracy_${MODEL}_${STAGE:-all}.txt"
timeout "${ACC_TIMEOUT:-580}" python3 -m bevdeploy.eval.accuracy --model "$MODEL" --stage "${STAGE:-all}" \
  --precisions $PRECISIONS ${KEEP_ROWS:+--keep-rows} ${EXTRA:-} > "$LOG" 2>&1
echo "accuracy rc=$?"
grep -v "it/s\]\|s/it\]\|^\s*$" "$LOG" | grep -E "^\[accuracy\]|trained|Error|error|Traceback" | tail -25
tail -3 "$LOG"
cp bench/results/*/accuracy-"$MODEL".json bench/results/*/accuracy-"$MODEL".md "$OUT/" 2>/dev/null
exit 0
