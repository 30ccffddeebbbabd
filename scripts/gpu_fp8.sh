#!/usr/bin/env bash
# One GPU call (<= 5 min) for the fp8 precisions: (1) the fp8 kernel tests, (2) fp8 vs cuDNN fp16
# channels-last per conv at BEVDet-R50 shapes (both fp8 GEMM backends for the 1x1s), timed in CUDA
# graphs, (3) the BEVDet table rows fp8-fp16 next to fp16x2 (results under $OUT/bench, the committed
# tables are left alone). Logs in $OUT. Needs nuscenes-devkit for (3): carry the wheels in .whl.
# Env: SKIP_BENCH=1 skips (3); ONLY_BENCH=1 runs (3) alone (two calls if one does not fit 5 minutes);
#      BENCH_TIMEOUT (seconds, default 200).
set -uo pipefail
[ "${SKIP_BENCH:-0}" != 1 ] && NEEDS=nuscenes; source scripts/device_prologue.sh  # (3) renders a synthetic world
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ -z "${ONLY_BENCH:-}" ]; then
# (1) kernel tests (the GPU file, then the CPU files: their reference / registration tests run here too)
timeout 150 python3 -m pytest -q -rs tests/quant/test_fp8_gpu.py tests/quant/test_fp8_kernels.py \
  tests/quant/test_fp8_modules.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/tests.txt" | tail -15

# (2) per-layer timing
timeout 90 python3 - > "$OUT/convs.md" 2> "$OUT/convs.err" <<'EOF'
import torch, torch.nn.functional as F
from bevdeploy.quant import fp8_kernels as fk

def timed(fn, reps=10, rounds=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    ts = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / reps * 1000)
    return sorted(ts)[len(ts) // 2]

B = 6  # cameras
layers = [  # (name, C, O, k, stride, H, W) of BEVDet-R50 at 256x704
    ("stem 7x7/2 3->64", 3, 64, 7, 2, 256, 704), ("l1 3x3 64->64", 64, 64, 3, 1, 64, 176),
    ("l1 1x1 64->256", 64, 256, 1, 1, 64, 176), ("l1 1x1 256->64", 256, 64, 1, 1, 64, 176),
    ("l2 3x3 128->128", 128, 128, 3, 1, 32, 88), ("l3 3x3 256->256", 256, 256, 3, 1, 16, 44),
    ("l3 1x1 1024->256", 1024, 256, 1, 1, 16, 44), ("l4 3x3 512->512", 512, 512, 3, 1, 8, 22),
    ("l4 1x1 512->2048", 512, 2048, 1, 1, 8, 22)]
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (CUDA graph, median), batch {B}")
print("| layer | fp16 cuDNN NHWC | fp8 (GEMM_BACKEND=scaled_mm) | fp8 triton | fp16 / fp8 best |")
print("| --- | --- | --- | --- | --- |")
for name, c, o, k, s, h, w in layers:
    x = torch.randn(B, c, h, w, device="cuda")
    wt = torch.randn(o, c, k, k, device="cuda") * (2.0 / (c * k * k)) ** 0.5
    bias = torch.randn(o, device="cuda")
    xh = x.half().contiguous(memory_format=torch.channels_last)
    wh = wt.half().contiguous(memory_format=torch.channels_last)
    bh = bias.half()
    t16 = timed(lambda: torch.relu_(F.conv2d(xh, wh, bh, s, k // 2)))
    sx = float(x.abs().amax()) / 448
    xq = fk.reference_quantize_fp8(x, sx).contiguous(memory_format=torch.channels_last)
    wq, ws = fk.quantize_weight_fp8(wt)
    wq = wq.permute(0, 2, 3, 1).contiguous()
    row = []
    for backend in ("scaled_mm", "triton"):
        f = lambda: fk._fp8_conv2d_cuda_or_triton(xq, wq, sx, ws, bias, [s, s], [k // 2] * 2, [1, 1], 1, None,
                                                  "relu", "float16", backend=backend)
        ref = fk.reference_fp8_conv2d(xq, wq, sx, ws, bias, [s, s], [k // 2] * 2, [1, 1], 1, None, "relu", "float16")
        err = ((f().float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, (name, backend, err)
        row.append(timed(f))
    print(f"| {name} | {t16:.1f} | {row[0]:.1f} | {row[1]:.1f} | {t16 / min(row):.2f}x |")
EOF
echo "convs rc=$?"; cat "$OUT/convs.md"; tail -3 "$OUT/convs.err"
fi

# (3) BEVDet table rows
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-200}" python3 -m bevdeploy.cli bench --model bevdet-r50 \
    --precisions pytorch fp16x2 fp8-fp16 --data synthetic:8 --calib synthetic:4 --out "$OUT/bench" \
    > "$OUT/bench_bevdet.txt" 2>&1
  echo "bench rc=$?"
  grep -E "FPS|Error|error|Traceback" "$OUT/bench_bevdet.txt" | tail -12
  cat "$OUT"/bench/*/bevdet-r50.md 2>/dev/null
fi
