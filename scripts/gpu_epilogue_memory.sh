#!/usr/bin/env bash
# One GPU call (~6-8 min) for issue 12's epilogue and memory items, each step under its own timeout:
#   1. the GPU tests of the new code: the fused conv-epilogue ops against the composite in fp16/fp32 (cuDNN's
#      fused call), the fused-block engine, and the CUDA stack-limit reader (tests/engine/test_conv_epilogue.py,
#      tests/eval/test_engine_memory.py)                                                      -> $OUT/tests.txt
#   2. scripts/conv_epilogue_timing.py: conv + separate bias/residual/ReLU pass vs cuDNN's fused conv-add-ReLU
#      at BEVFormer-tiny's ResNet-50 shapes                              -> bench/results/<gpu>/conv-epilogue-timing.md
#   3. profiles of BEVFormer-tiny and BEVDet fp16x2, plain and --fused-epilogues, same machine and run
#      (scripts/profile_engine.py; ms/frame of each; the engines' Inductor wrapper code, which shows each copy
#      and the node it serves, in $OUT/code)                            -> bench/results/<gpu>/profile-*.md
#   4. BEVFormer-base PyTorch + fp16x2 memory in a fresh serving process, now with the allocator's share after the
#      load and the CUDA stack reservation before and after Engine.release_stack (gpu_batch.sh's base rows)
#                                                                        -> bench/results/<gpu>/bevformer-base-memory.*
# Usage (GPU machine, repo root; carry .whl): bash scripts/gpu_epilogue_memory.sh
# Env: TEST_TIMEOUT (150), TIMING_TIMEOUT (150), PROFILE_TIMEOUT (240), MEMORY_TIMEOUT (300), SKIP_MEMORY=1,
#      PROFILE_MODELS ("bevformer-tiny bevdet-r50-cbgs").
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q tests/engine/test_conv_epilogue.py tests/eval/test_engine_memory.py \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at ${SECONDS}s"; tail -3 "$OUT/tests.txt"

timeout "${TIMING_TIMEOUT:-150}" python3 scripts/conv_epilogue_timing.py --out "$OUT" > "$OUT/conv_epilogue.txt" 2>&1
echo "epilogue timing rc=$? at ${SECONDS}s"; tail -18 "$OUT/conv_epilogue.txt"

specs=""; for m in ${PROFILE_MODELS:-bevformer-tiny bevdet-r50-cbgs}; do specs="$specs $m:fp16x2"; done
timeout "${PROFILE_TIMEOUT:-240}" bash -c "python3 scripts/profile_engine.py --build $specs --work /tmp/prof \
  --save-code $OUT/code && python3 scripts/profile_engine.py --build $specs --work /tmp/prof --fused-epilogues \
  --save-code $OUT/code" > "$OUT/profiles.txt" 2>&1
echo "profiles rc=$? at ${SECONDS}s"; grep -E "ms/frame|^-> |Error" "$OUT/profiles.txt" | tail -12

if [ -z "${SKIP_MEMORY:-}" ]; then
  timeout "${MEMORY_TIMEOUT:-300}" python3 -m bevdeploy.cli bench --model bevformer-base --precisions pytorch fp16x2 \
    --batch 1 --data synthetic:2 --results-name bevformer-base-memory > "$OUT/memory.txt" 2>&1
  echo "memory rc=$? at ${SECONDS}s"; grep -E "FPS|Error|error|Traceback" "$OUT/memory.txt" | tail -6
fi
cp -r "bench/results" "$OUT/results" 2>/dev/null
echo "total ${SECONDS}s"
