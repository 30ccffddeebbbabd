#!/usr/bin/env bash
# One GPU call (~8-9 min) for issue 12: BEVFormer-small and -base, PyTorch, fp16x2 and fp16x2 with
# --fused-epilogues in one run each (random weights: latency and SQNR; the DCN blocks of fp16x2 engines fuse
# since session 17, with the ReLU in the DCN's epilogue), then base fp16x2's serving memory under several
# process settings (scripts/engine_memory_env.py on the engine the bench just built: a warm machine's re-synced
# tree drops it, so in the same call).
#   -> bench/results/<gpu>/bevformer-{small,base}-fused.{json,md}, bevformer-base-fp16x2-memory-env.{json,md}
# Usage (GPU machine, repo root; carry .whl): bash scripts/gpu_bevformer_fused.sh
# Env: MODELS ("bevformer-small bevformer-base"), DATA (synthetic:4), BUDGET (570 s for the whole call),
#      SMALL_TIMEOUT (220 s), BASE_TIMEOUT (300 s), MEMORY=0 (skip the memory step; it runs only with >= 90 s left).
# Measured (session 17, H100, base, DATA synthetic:8): PyTorch + fp16x2 rows in ~180 s, the fused build after
# them cut by a 250 s timeout; hence 300 s for base.
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
BUDGET=${BUDGET:-570}
for M in ${MODELS:-bevformer-small bevformer-base}; do
  t0=$SECONDS
  T=${SMALL_TIMEOUT:-220}; [ "$M" = bevformer-base ] && T=${BASE_TIMEOUT:-300}
  [ $T -gt $(( BUDGET - SECONDS )) ] && T=$(( BUDGET - SECONDS ))
  if [ $T -lt 60 ]; then echo "$M skipped: $T s left"; continue; fi  # (timeout 0 would mean none)
  timeout "$T" python3 -m bevdeploy.cli bench --model "$M" --precisions pytorch fp16x2 \
    --fused-epilogues --data "${DATA:-synthetic:4}" --calib "${DATA:-synthetic:4}" --results-name "$M-fused" \
    > "$OUT/bench_$M.txt" 2>&1
  echo "$M rc=$? in $((SECONDS - t0)) s"; grep -E "FPS|Error|Traceback" "$OUT/bench_$M.txt" | tail -5
done
ENGINE=out/engines/bevformer-base-fp16x2.engine
if [ "${MEMORY:-1}" != 0 ] && [ -f "$ENGINE" ] && [ $(( BUDGET - SECONDS )) -ge 90 ]; then
  timeout $(( BUDGET - SECONDS )) python3 scripts/engine_memory_env.py "$ENGINE" --iters 10 > "$OUT/memory_env.txt" 2>&1
  echo "memory rc=$?"; tail -5 "$OUT/memory_env.txt"
fi
save_results
echo "total $SECONDS s"
