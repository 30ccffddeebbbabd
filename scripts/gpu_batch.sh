#!/usr/bin/env bash
# One GPU call (<= 240 s) for issue 12 items 4-5: (1) BEVFormer-tiny PyTorch FP32 and the fp16x2 engine
# at batch 1, 4 and 8 (independent streams; FPS = frames per second on the GPU), written to
# bench/results/<gpu>/bevformer-tiny-batch.{json,md}; (2) if time is left, BEVFormer-base PyTorch and
# fp16x2 at batch 1 with the engine's eager weights discarded, bevformer-base-memory.{json,md} (the
# main tables are left alone). Both copied to $OUT with the logs; the targets are checked at the end:
# tiny fp16x2 batch 8 >= 2.5x the frames/s of batch 1; base fp16x2 device memory <= 0.45x PyTorch's.
# Needs nuscenes-devkit: carry the wheels in .whl (installed into /tmp/site, as gpu_bench.sh does).
# Env: TINY_TIMEOUT (170), CALL_BUDGET (230: seconds the whole call may take), BASE_TIMEOUT (cap; what is left of
#      CALL_BUDGET), DATA (synthetic:2), SKIP_BASE=1,
#      SKIP_TINY=1 (a second call for the base rows alone if the first had no time left for them),
#      BEVDET=1 (also BEVDet-R50 pytorch + fp16x2 at batch 1/4/8 with the time left, bevdet-r50-batch.json).
# Expected: tiny ~2-3 min (three fp16x2 builds + Inductor compiles, cold cache), base only if >= 60 s remain.
# The base rows alone, with the fp16x2 engine's memory read in a fresh serving process (the default since the
# committed in-process 0.679x): SKIP_TINY=1 CALL_BUDGET=400 bash scripts/gpu_batch.sh
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
DATA=${DATA:-synthetic:2}

# (1) tiny: a row per batch (the results file is rewritten after every row: a cut run keeps its rows)
if [ -z "${SKIP_TINY:-}" ]; then
  timeout "${TINY_TIMEOUT:-170}" python3 -m bevdeploy.cli bench --model bevformer-tiny --precisions pytorch fp16x2 \
    --batch 1 4 8 --data "$DATA" > "$OUT/bench_tiny_batch.txt" 2>&1
  echo "tiny rc=$? at ${SECONDS}s"
  grep -E "FPS|Error|error|Traceback" "$OUT/bench_tiny_batch.txt" | tail -12
fi

# (2) base memory rows, with what is left of the call
CALL_BUDGET=${CALL_BUDGET:-230}
LEFT=$((CALL_BUDGET - SECONDS)); [ -n "${BASE_TIMEOUT:-}" ] && [ "$BASE_TIMEOUT" -lt "$LEFT" ] && LEFT=$BASE_TIMEOUT
if [ -z "${SKIP_BASE:-}" ] && [ "$LEFT" -ge 60 ]; then
  timeout "$LEFT" python3 -m bevdeploy.cli bench --model bevformer-base --precisions pytorch fp16x2 --batch 1 \
    --data "$DATA" --results-name bevformer-base-memory > "$OUT/bench_base_memory.txt" 2>&1
  echo "base rc=$? at ${SECONDS}s"
  grep -E "FPS|Error|error|Traceback" "$OUT/bench_base_memory.txt" | tail -8
else
  echo "base memory rows skipped (${LEFT}s left; SKIP_TINY=1 runs them alone)"
fi

# (3) optional (BEVDET=1): BEVDet-R50 rows per batch (no temporal state: a batch is N frames in one call)
LEFT=$((CALL_BUDGET - SECONDS))
if [ -n "${BEVDET:-}" ] && [ "$LEFT" -ge 60 ]; then
  timeout "$LEFT" python3 -m bevdeploy.cli bench --model bevdet-r50 --precisions pytorch fp16x2 --batch 1 4 8 \
    --data "$DATA" > "$OUT/bench_bevdet_batch.txt" 2>&1
  echo "bevdet rc=$? at ${SECONDS}s"
  grep -E "FPS|Error|error|Traceback" "$OUT/bench_bevdet_batch.txt" | tail -8
fi

cp bench/results/*/bevformer-tiny-batch.* bench/results/*/bevformer-base-memory.* bench/results/*/bevdet-r50-batch.* \
  "$OUT/" 2>/dev/null
timeout 20 python3 - <<'EOF' | tee "$OUT/targets.txt"
import glob, json

def rows(name):
    files = glob.glob(f"bench/results/*/{name}.json")
    return json.load(open(files[0]))["rows"] if files else []

tiny = {(r["precision"], r["batch"]): r for r in rows("bevformer-tiny-batch")}
for (p, b), r in sorted(tiny.items()):
    print(f"tiny {p} batch {b}: {r['fps']} frames/s ({r.get('fps_vs_batch1')}x batch 1, {r['fps_ratio']}x PyTorch), "
          f"latency {r.get('latency_ms')} ms, mem {r['memory_mb']} MB, peak {r.get('peak_allocated_mb')} MB, "
          f"SQNR {r.get('output_sqnr_db')} dB, eager weights {r.get('eager_weights_mb')} MB")
r8 = tiny.get(("fp16x2", 8))
print("target tiny fp16x2 batch 8 >= 2.5x batch 1:",
      "not measured" if r8 is None or r8.get("fps_vs_batch1") is None
      else f"{r8['fps_vs_batch1']}x -> {'met' if r8['fps_vs_batch1'] >= 2.5 else 'missed'}")
for r in rows("bevdet-r50-batch"):
    print(f"bevdet {r['precision']} batch {r['batch']}: {r['fps']} frames/s ({r.get('fps_vs_batch1')}x batch 1), "
          f"mem {r['memory_mb']} MB, SQNR {r.get('output_sqnr_db')} dB")
base = {r["precision"]: r for r in rows("bevformer-base-memory")}
for p, r in base.items():
    print(f"base {p}: mem {r['memory_mb']} MB ({r['memory_ratio']}x), peak {r.get('peak_allocated_mb')} MB "
          f"({r.get('peak_ratio')}x), {r['fps']} FPS, eager weights {r.get('eager_weights_mb')} MB, in-process "
          f"{r.get('memory_inprocess_mb')} MB, fresh process: context {r.get('memory_context_mb')} MB, loaded "
          f"{r.get('memory_loaded_mb')} MB")
e = base.get("fp16x2")
print("target base fp16x2 memory <= 0.45x PyTorch:",
      "not measured" if e is None else f"{e['memory_ratio']}x -> {'met' if e['memory_ratio'] <= 0.45 else 'missed'}")
EOF
echo "total ${SECONDS}s"
