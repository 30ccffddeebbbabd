#!/usr/bin/env bash
# One GPU call: environment facts, the op/quant/export tests on CUDA (no interpreter), then the op
# benchmark. Usage (GPU machine, repo root): bash scripts/gpu_check.sh [pytest paths...]
# Env: SKIP_TESTS=1, SKIP_BENCH=1, BENCH_OPS="msda bev_pool_v2", TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
# Logs go to $OUT (or ./out); bench results to bench/results/<gpu>/ and are copied to $OUT.
set -uo pipefail
source scripts/device_prologue.sh
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
TESTS=${@:-tests/ops tests/quant tests/export}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-270}" python3 -m pytest -q --maxfail=30 -p no:cacheprovider $TESTS > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.txt" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-270}" python3 -m bevdeploy.cli bench ops ${BENCH_OPS:+--ops $BENCH_OPS} > "$OUT/bench.txt" 2>"$OUT/bench_stderr.txt"
  echo "bench rc=$?"; tail -60 "$OUT/bench.txt"; tail -5 "$OUT/bench_stderr.txt"
  cp bench/results/*/ops.* "$OUT/" 2>/dev/null
fi
