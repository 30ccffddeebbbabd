#!/usr/bin/env bash
# One GPU call for the user's workflow: build a BEVFormer-tiny fp16 engine, evaluate it and the
# PyTorch model on the same synthetic world (full devkit summary, submission JSON, metrics JSON),
# draw two frames, and check the tiny ONNX export in onnxruntime. Logs and files go to $OUT.
# Needs nuscenes-devkit (and onnxruntime-extensions for the ONNX check) on the GPU machine: carry the
# wheels in .whl (see the device README); they are installed into /tmp/site here.
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
B="python3 -m bevdeploy.cli"
DATA=${DATA:-synthetic:16}
timeout 200 $B build --model bevformer-tiny --precision fp16 -o "$OUT/tiny-fp16.engine" -q > "$OUT/build.txt" 2>&1; echo "build rc=$?"
timeout 200 $B eval --engine "$OUT/tiny-fp16.engine" --data "$DATA" --results "$OUT/results-engine.json" \
  --metrics "$OUT/metrics-engine.json" -q > "$OUT/eval-engine.txt" 2>&1; echo "eval --engine rc=$?"
timeout 120 $B eval --model bevformer-tiny --data "$DATA" --metrics "$OUT/metrics-model.json" -q > "$OUT/eval-model.txt" 2>&1
echo "eval --model rc=$?"
head -3 "$OUT/eval-engine.txt" "$OUT/eval-model.txt"
timeout 120 $B show --engine "$OUT/tiny-fp16.engine" --data "$DATA" --frames 2 -o "$OUT/show" -q > "$OUT/show.txt" 2>&1
echo "show rc=$?"; tail -1 "$OUT/show.txt"
timeout 200 $B export --model bevformer-tiny -o /tmp/tiny.onnx --check > "$OUT/onnx.txt" 2>&1; echo "export --check rc=$?"
tail -5 "$OUT/onnx.txt"
