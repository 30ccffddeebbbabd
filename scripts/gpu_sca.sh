#!/usr/bin/env bash
# One GPU call (~2 min, <= 150 s): the camera-gathered SCA op (issue 12 item 1) on CUDA.
#  1. tests/ops/test_sca.py with compiled kernels (no interpreter): every variant against the
#     static form, the reduced BEVFormer with the gathered switch on and off;
#  2. `bevdeploy bench ops --ops sca`: BEVFormer-base layer (6 cameras, 40000 queries, rig
#     visibility), gathered op vs the static form per variant (target: fp16 <= 0.6 ms on an H100).
# Usage (GPU machine, repo root): bash scripts/gpu_sca.sh
# Logs go to $OUT (or ./out); results to bench/results/<gpu>/ops-sca.{json,md} (not ops.json, which
# holds the full op table) and are copied to $OUT.
set -uo pipefail
source scripts/device_prologue.sh
unset TRITON_INTERPRET  # compiled kernels only (tests/conftest.py turns the interpreter on only without CUDA)
timeout 10 python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
# most of the test time is Triton compiling ~25 kernel specialisations: spread them over workers
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
timeout 60 python3 -m pytest -q -p no:cacheprovider $XDIST tests/ops/test_sca.py > "$OUT/sca_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/sca_tests.txt" | tail -20
TMP_RES=$(mktemp -d)
timeout 70 python3 -m bevdeploy.cli bench ops --ops sca --out "$TMP_RES" > "$OUT/sca_bench.txt" 2> "$OUT/sca_bench_stderr.txt"
echo "bench rc=$?"; tail -12 "$OUT/sca_bench.txt"; tail -3 "$OUT/sca_bench_stderr.txt"
for dir in "$TMP_RES"/*/; do
  [ -f "$dir/ops.json" ] || continue
  gpu=$(basename "$dir"); mkdir -p "bench/results/$gpu"
  cp "$dir/ops.json" "bench/results/$gpu/ops-sca.json"; cp "$dir/ops.md" "bench/results/$gpu/ops-sca.md"
  cp "$dir/ops.json" "$OUT/ops-sca.json"; cp "$dir/ops.md" "$OUT/ops-sca.md"
done
rm -rf "$TMP_RES"
