#!/usr/bin/env bash
# One GPU call (<= ~5 min; the first H100 run needed 63 s for the checks + autotune alone and was cut at 90 s): the implicit-GEMM DCNv2 kernel (issue 12 item 2) on CUDA.
#   1. check + bench (one process, so the autotuned configs are shared): at every BEVFormer R101-DCN
#      layer shape, the new kernel against the fp32 reference (relative error), then
#      `bench ops` entry modulated_deform_conv2d_igemm: new kernel, old plan kernel, cuDNN fp16
#      channels-last plain 3x3 conv, CUDA graphs, median; ratio new / cuDNN (target <= 1.5).
#   2. the DCN op tests on CUDA (no interpreter): the new kernel's file first, then the existing one.
# Usage (GPU machine, repo root): bash scripts/gpu_dcn.sh
# Env: DCN_VARIANTS ("fp16 fp16x2"; add fp32 for the 3xTF32 path, int8 for the int8 kernel: codes at amax / 127),
#      BENCH_TIMEOUT (200), TEST_TIMEOUT (90).
# Results: bench/results/<gpu>/dcn_igemm.{json,md}; logs, results and the tuned configs in $OUT.
set -uo pipefail
source scripts/device_prologue.sh
export DCN_VARIANTS=${DCN_VARIANTS:-fp16 fp16x2}
timeout 20 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1 | tee "$OUT/env.txt"

timeout "${BENCH_TIMEOUT:-200}" python3 - > "$OUT/dcn_bench.txt" 2>&1 <<'PY'
import json, os, shutil, sys, time
import torch
from bevdeploy.eval import bench_ops
from bevdeploy.eval.timing import gpu_dirname
from bevdeploy.ops import modulated_deform_conv2d as mdc

out = os.environ.get("OUT", "out")
variants = tuple(os.environ["DCN_VARIANTS"].split())
t0 = time.time()
# correctness at the real shapes first (this also runs each variant's autotune, cached for the bench)
with torch.no_grad():
    for case in bench_ops.dcn_igemm_cases(variants=variants):
        ref = case.reference().double()
        for v in variants:
            y = case.make(v)()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            print(f"[check] {case.shape} {v}: rel err {err:.2e} nan {torch.isnan(y).any().item()} "
                  f"channels_last {y.is_contiguous(memory_format=torch.channels_last)} ({time.time() - t0:.0f} s)",
                  flush=True)
        del ref
print("[tuned]", {str(k[:4]): v for k, v in mdc._TUNED.items()}, flush=True)
bench_ops.ALL_CASES["modulated_deform_conv2d_igemm"] = lambda: bench_ops.dcn_igemm_cases(variants=variants)
tmp = os.path.join(out, "bench_tmp")
result = bench_ops.run(["modulated_deform_conv2d_igemm"], tmp, command="bash scripts/gpu_dcn.sh")
print(bench_ops.to_markdown(result))
print("[tuned]", {str(k[:4]): v for k, v in mdc._TUNED.items()}, flush=True)
dst = os.path.join("bench", "results", gpu_dirname())
os.makedirs(dst, exist_ok=True)
for ext in ("json", "md"):
    shutil.copy(os.path.join(tmp, gpu_dirname(), f"ops.{ext}"), os.path.join(dst, f"dcn_igemm.{ext}"))
    shutil.copy(os.path.join(tmp, gpu_dirname(), f"ops.{ext}"), os.path.join(out, f"dcn_igemm.{ext}"))
print(f"[done] {time.time() - t0:.0f} s", flush=True)
PY
echo "bench rc=$?"; grep -E "^\[check\]|^\[tuned\]|^\[done\]|^\| modulated|Error|error" "$OUT/dcn_bench.txt" | tail -40
# a run cut short keeps the cases it finished
ls "$OUT"/bench_tmp/*/ops.json >/dev/null 2>&1 && cp "$OUT"/bench_tmp/*/ops.json "$OUT/dcn_igemm_partial.json"

timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q --maxfail=20 -p no:cacheprovider \
  tests/ops/test_modulated_deform_conv2d_igemm.py tests/ops/test_modulated_deform_conv2d.py > "$OUT/dcn_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/dcn_tests.txt" | tail -30
exit 0
