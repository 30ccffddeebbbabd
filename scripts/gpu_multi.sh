#!/usr/bin/env bash
# Issue 16's run, one call of a multi-GPU machine (nvidia-h100-x2/-x4/-x8 when `status` lists one):
# scripts/multi_gpu_bench.py on all GPUs here against one: BEVDet-R50 training (DDP), int8 QAT build and the
# held-out evaluation, each as `torchrun --nproc-per-node K -m bevdeploy.cli ...` for K = 1 and K = N
# -> bench/results/<gpu>/multi-gpu.{md,json} and $OUT (targets: training >= 0.85 x N, eval >= 0.9 x N, same NDS).
# Needs nuscenes-devkit (synthetic world, NDS): carry .whl.
# Env: NPROC (all GPUs), STEPS (40), BATCH (8 per process), QAT_STEPS (30), QAT_BATCH (4), TRAIN_DATA
#      (synthetic:600@1), EVAL_DATA (synthetic:120@2), CALIB (synthetic:64@1), STAGE_TIMEOUT (240 s a command).
# Expected (estimates from the one-GPU BEVDet rows: ~1 s/step at batch 8 alone): render ~60 s (16+ cores),
# train 2 x ~60 s, QAT builds 2 x ~60 s, eval 2 x ~40 s: ~7 min.
set -uo pipefail
NEEDS="nuscenes"; source scripts/device_prologue.sh
timeout 20 nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/multi_gpu_bench.py ${NPROC:+--nproc "$NPROC"} --steps "${STEPS:-40}" --batch "${BATCH:-8}" \
  --qat-steps "${QAT_STEPS:-30}" --qat-batch "${QAT_BATCH:-4}" --train-data "${TRAIN_DATA:-synthetic:600@1}" \
  --eval-data "${EVAL_DATA:-synthetic:120@2}" --calib "${CALIB:-synthetic:64@1}" --work /tmp/multi-gpu \
  --stage-timeout "${STAGE_TIMEOUT:-240}" --out "$OUT" 2>&1 | tee "$OUT/multi_gpu.log"
echo "rc=$? at ${SECONDS}s"
tar czf "$OUT/multi-gpu-logs.tgz" -C /tmp/multi-gpu $(cd /tmp/multi-gpu 2>/dev/null && ls *.log) 2>/dev/null
