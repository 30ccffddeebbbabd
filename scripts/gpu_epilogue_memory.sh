#!/usr/bin/env bash
# Two GPU calls (~9-10 min each at most) for issue 12's epilogue and memory items and CenterNet's engine waste,
# each step under its own timeout:
#   1. the GPU tests of the new code: the fused conv-epilogue ops against the composite in fp16/fp32 (cuDNN's
#      fused call), the fused-block engine, the CUDA stack-limit reader and a CUDA-graph engine's results after
#      the next call (tests/engine/test_conv_epilogue.py, tests/eval/test_engine_memory.py, test_engine_det2d.py)
#                                                                                               -> $OUT/tests.txt
#   2. scripts/conv_epilogue_timing.py: conv + separate bias/residual/ReLU pass vs cuDNN's fused conv-add-ReLU
#      at BEVFormer-tiny's ResNet-50 shapes                              -> bench/results/<gpu>/conv-epilogue-timing.md
#   3. profiles of BEVFormer-tiny and BEVDet fp16x2, plain and --fused-epilogues, same machine and run
#      (scripts/profile_engine.py; ms/frame of each; the engines' Inductor wrapper code, which shows each copy
#      and the node it serves, in $OUT/code)                            -> bench/results/<gpu>/profile-*.md
#   3b. the same for CenterNet int8-fp16 at batch 32 (PROFILE_2D; random weights, calibrated on synthetic2d:32):
#      its float stem's bias + ReLU pass and the aten copies around the DCNs (profile-centernet-r18-dcn-*.md)
#   4. (ONLY_MEMORY=1, the second call) BEVFormer-base PyTorch + fp16x2 memory in a fresh serving process, with
#      the allocator's share after the load and the CUDA stack reservation before and after Engine.release_stack
#      (gpu_batch.sh's base rows)                                        -> bench/results/<gpu>/bevformer-base-memory.*
# Usage (GPU machine, repo root; carry .whl): bash scripts/gpu_epilogue_memory.sh; then, warm:
#   ONLY_MEMORY=1 bash scripts/gpu_epilogue_memory.sh
# Env: TEST_TIMEOUT (120), TIMING_TIMEOUT (100), PROFILE_TIMEOUT (200), PROFILE_2D_TIMEOUT (150), MEMORY_TIMEOUT
#      (300), PROFILE_MODELS ("bevformer-tiny bevdet-r50-cbgs"), PROFILE_2D ("centernet-r18-dcn:int8-fp16"; empty:
#      none), SKIP_MEMORY (kept for old commands: the first call never measures memory now).
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

if [ -z "${ONLY_MEMORY:-}" ]; then
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q tests/engine/test_conv_epilogue.py tests/engine/test_image_layout.py tests/eval/test_engine_memory.py \
    "tests/engine/test_engine_det2d.py::test_cuda_graph_engine_results_outlive_the_next_call" > "$OUT/tests.txt" 2>&1
  echo "tests rc=$? at ${SECONDS}s"; tail -3 "$OUT/tests.txt"

  timeout "${TIMING_TIMEOUT:-100}" python3 scripts/conv_epilogue_timing.py --out "$OUT" > "$OUT/conv_epilogue.txt" 2>&1
  echo "epilogue timing rc=$? at ${SECONDS}s"; tail -18 "$OUT/conv_epilogue.txt"

  specs=""; for m in ${PROFILE_MODELS:-bevformer-tiny bevdet-r50-cbgs}; do specs="$specs $m:fp16x2"; done
  timeout "${PROFILE_TIMEOUT:-200}" bash -c "python3 scripts/profile_engine.py --build $specs --work /tmp/prof \
    --save-code $OUT/code && python3 scripts/profile_engine.py --build $specs --work /tmp/prof --fused-epilogues \
    --save-code $OUT/code" > "$OUT/profiles.txt" 2>&1
  echo "profiles rc=$? at ${SECONDS}s"; grep -E "ms/frame|^-> |Error" "$OUT/profiles.txt" | tail -12

  if [ -n "${PROFILE_2D-centernet-r18-dcn:int8-fp16}" ]; then
    specs2d="${PROFILE_2D-centernet-r18-dcn:int8-fp16}"
    timeout "${PROFILE_2D_TIMEOUT:-150}" bash -c "python3 scripts/profile_engine.py --build $specs2d --calib synthetic2d:32 \
      --work /tmp/prof --save-code $OUT/code && python3 scripts/profile_engine.py --build $specs2d --calib synthetic2d:32 \
      --work /tmp/prof --fused-epilogues --save-code $OUT/code" > "$OUT/profiles_2d.txt" 2>&1
    echo "2D profiles rc=$? at ${SECONDS}s"; grep -E "ms/frame|^-> |Error" "$OUT/profiles_2d.txt" | tail -6
  fi
fi

if [ -n "${ONLY_MEMORY:-}" ]; then
  timeout "${MEMORY_TIMEOUT:-300}" python3 -m bevdeploy.cli bench --model bevformer-base --precisions pytorch fp16x2 \
    --batch 1 --data synthetic:2 --results-name bevformer-base-memory > "$OUT/memory.txt" 2>&1
  echo "memory rc=$? at ${SECONDS}s"; grep -E "FPS|Error|error|Traceback" "$OUT/memory.txt" | tail -6
fi
save_results  # the files this call wrote, under $OUT/results/<gpu>/
echo "total ${SECONDS}s"
