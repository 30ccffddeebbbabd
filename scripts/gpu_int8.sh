#!/usr/bin/env bash
# ONE GPU call (<= 9 min) for the int8 chain: the int8 kernel / chain / autotune tests on CUDA,
# `bevdeploy bench convs`, the BEVDet-R50 table for fp16x2 vs int8-fp16, and engine profiles.
# Usage (GPU machine, repo root): bash scripts/gpu_int8.sh     Logs and results go to $OUT (or ./out).
# Needs nuscenes-devkit for the model table: carry its wheels in .whl (as scripts/gpu_bench.sh).
# Env: SKIP_TESTS=1 SKIP_CONVS=1 SKIP_BENCH=1 SKIP_PROFILE=1; CONV_BACKBONES ("bevdet-r50 bevformer-small
#      bevformer-base"); BENCH_MODELS ("bevdet-r50": one table each, precisions BENCH_PRECISIONS, default
#      "pytorch fp16x2 int8-fp16"); PROFILES (MODEL:PRECISION pairs, default the BEVDet ones); per-step limits
#      APPEND=1 (keep the earlier rows of each table); BENCH_EXTRA / PROFILE_EXTRA: more flags of the bench /
#      profile commands (e.g. --int8-dcn: BEVFormer-small/base rows and profiles with int8 DCNs; each engine row
#      also loads its engine once more in a fresh process for its memory, --inprocess-memory skips that); in seconds: TEST_TIMEOUT (70) CONVS_TIMEOUT (190) BENCH_TIMEOUT (190, per model) PROFILE_TIMEOUT (80). Every step writes its results as it goes, so a cut step keeps what it measured.
set -uo pipefail
{ [ "${SKIP_BENCH:-0}" != 1 ] || [ "${SKIP_PROFILE:-0}" != 1 ]; } && NEEDS=nuscenes; source scripts/device_prologue.sh  # the tables and profiles render a synthetic world
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-70}" python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests/quant/test_int8_kernels.py \
    tests/quant/test_int8_chain.py tests/quant/test_autotune.py -k "not engine" > "$OUT/tests_int8.txt" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests_int8.txt" | tail -20
fi
if [ "${SKIP_CONVS:-0}" != 1 ]; then
  timeout "${CONVS_TIMEOUT:-190}" python3 -m bevdeploy.cli bench convs ${CONV_BACKBONES:+--backbones $CONV_BACKBONES} \
    > "$OUT/convs.txt" 2> "$OUT/convs_stderr.txt"
  echo "convs rc=$?"; cat bench/results/*/convs.md 2>/dev/null | tail -80; tail -5 "$OUT/convs_stderr.txt"
  cp bench/results/*/convs.* "$OUT/" 2>/dev/null
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for model in ${BENCH_MODELS:-bevdet-r50}; do
    timeout "${BENCH_TIMEOUT:-190}" python3 -m bevdeploy.cli bench --model "$model" \
      --precisions ${BENCH_PRECISIONS:-pytorch fp16x2 int8-fp16} --data synthetic:${BENCH_FRAMES:-8} --calib synthetic:4 ${APPEND:+--append} \
      ${BENCH_EXTRA:-} \
      > "$OUT/bench_$model.txt" 2>&1
    echo "bench $model rc=$?"; grep -E "^\|" "$OUT/bench_$model.txt" | tail -8; grep -E "Error|Traceback" "$OUT/bench_$model.txt" | tail -5
    cp bench/results/*/"$model".* "$OUT/" 2>/dev/null
  done
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  # reuses the engines the bench just built (out/engines/<model>-<precision>.engine)
  timeout "${PROFILE_TIMEOUT:-80}" python3 scripts/profile_engine.py --build ${PROFILES:-bevdet-r50:int8-fp16 bevdet-r50:fp16x2} ${PROFILE_EXTRA:-} \
    --calib synthetic:4 > "$OUT/profile.txt" 2>&1
  echo "profile rc=$?"; grep -E "ms/frame|->|Error" "$OUT/profile.txt" | tail -8
  cp bench/results/*/profile-* "$OUT/" 2>/dev/null
fi
