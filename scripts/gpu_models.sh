#!/usr/bin/env bash
# One GPU call for the models: PyTorch FP32 FPS of each BEVFormer at full resolution (random weights),
# then `bevdeploy eval` end to end on a synthetic world. Needs nuscenes-devkit on the GPU machine:
# carry wheels in .whl (see the device README) - installed here into /tmp/site.
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
MODELS=${MODELS:-bevformer-tiny bevformer-small bevformer-base}
timeout "${FPS_TIMEOUT:-240}" python3 -m bevdeploy.cli bench --model $MODELS 2>&1 | tee "$OUT/fps.txt" | grep -v "it/s\]" | tail -8
cp bench/results/*/bevformer-*.json bench/results/*/bevformer-*.md "$OUT/" 2>/dev/null
timeout "${EVAL_TIMEOUT:-240}" python3 -m bevdeploy.cli eval --model bevformer-tiny --data synthetic:${EVAL_N:-32} --workers 16 \
  --save-run "$OUT/run_tiny_synthetic.json" > "$OUT/eval.txt" 2> "$OUT/eval_stderr.txt"
echo "eval rc=$?"; tail -3 "$OUT/eval.txt"; grep -v "it/s\]\|s/it\]" "$OUT/eval_stderr.txt" | tail -5
