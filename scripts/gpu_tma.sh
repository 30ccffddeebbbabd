#!/usr/bin/env bash
# One GPU call (<= 9.5 min) for the TMA int8 conv kernel and the image-reading stem, each step under its own timeout:
#   1. GPU tests of the new code: the TMA conv kernel against the pointer-gather kernel and float64 (stride
#      phases, padding by TMA's zero fill, int8 out), autotune's output check and TMA candidates, image_nhwc, the
#      fused stem and blocks, a CUDA-graph engine's results after the next call                -> $OUT/tests.txt
#   2. bevdeploy bench convs on CONVS_BACKBONES (default CenterNet's whole network): each conv's best TMA and best
#      other config against cuDNN fp16 in the same run                        -> bench/results/<gpu>/convs-tma.md
#   3. CenterNet int8-fp16 at batch 32, plain and --fused-epilogues (the stem's image_nhwc + cuDNN conv-bias-ReLU),
#      both autotuned with the TMA candidates; Inductor code in $OUT/code  -> bench/results/<gpu>/profile-*.md
# Usage (GPU machine, repo root; carry .whl): bash scripts/gpu_tma.sh
# Env: TEST_TIMEOUT (120), CONVS_TIMEOUT (170), PROFILE_TIMEOUT (220), CONVS_BACKBONES ("centernet-r18-dcn"),
#      PROFILE_SPECS ("centernet-r18-dcn:int8-fp16").
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -k "tma or packed or differs or image or fused or stem or cuda_graph" \
  tests/quant/test_int8_kernels.py tests/quant/test_autotune.py tests/engine/test_image_layout.py \
  tests/engine/test_conv_epilogue.py tests/engine/test_engine_det2d.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at ${SECONDS}s"; tail -3 "$OUT/tests.txt"

timeout "${CONVS_TIMEOUT:-170}" python3 -m bevdeploy.cli bench convs --backbones ${CONVS_BACKBONES:-centernet-r18-dcn} \
  --results-name convs-tma > "$OUT/convs.txt" 2>&1
echo "convs rc=$? at ${SECONDS}s"; grep -E "TMA|failed|left out|Error" "$OUT/convs.txt" | tail -30

specs="${PROFILE_SPECS:-centernet-r18-dcn:int8-fp16}"
timeout "${PROFILE_TIMEOUT:-220}" bash -c "python3 scripts/profile_engine.py --build $specs --calib synthetic2d:32 \
  --work /tmp/prof --save-code $OUT/code && python3 scripts/profile_engine.py --build $specs --calib synthetic2d:32 \
  --work /tmp/prof --fused-epilogues --save-code $OUT/code" > "$OUT/profiles.txt" 2>&1
echo "profiles rc=$? at ${SECONDS}s"; grep -E "ms/(frame|call)|^-> |Error|autotune" "$OUT/profiles.txt" | tail -12
save_results  # the files this call wrote, under $OUT/results/<gpu>/
echo "total ${SECONDS}s"
