#!/usr/bin/env bash
# One GPU call (<= 8 min): the 2D tables, `bevdeploy bench --model M --batch 32` for YOLOX-x then
# CenterNet-R18-DCN, PyTorch eager FP32 + fp16x2 + int8-fp16 engines, COCO mAP on synthetic 2D views
# (random weights unless CHECKPOINT_<model> is set). Results under bench/results/<gpu>/ and in $OUT.
# pycocotools must be importable on the GPU machine: carry its wheel (cp312) in .whl with the others.
# Env: PRECISIONS, DATA (synthetic2d:64), CALIB (synthetic2d:32), BATCH (32), MODELS,
#      YOLOX_TIMEOUT / CENTERNET_TIMEOUT (seconds; the results file is rewritten after every row).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BEVDEPLOY_CACHE=/tmp/bevcache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import pycocotools" 2>/dev/null || echo "WARNING: no pycocotools here: the rows get FPS/size/memory/SQNR but no mAP"
PRECISIONS=${PRECISIONS:-pytorch fp16x2 int8-fp16}
DATA=${DATA:-synthetic2d:64}
# render the synthetic views once, before any timed work
python3 -c "from bevdeploy.data.det2d import resolve_det2d_spec as r; r('$DATA', progress=False); r('${CALIB:-synthetic2d:32}', progress=False)"
for MODEL in ${MODELS:-yolox-x centernet-r18-dcn}; do
  case $MODEL in yolox-x) T=${YOLOX_TIMEOUT:-250};; *) T=${CENTERNET_TIMEOUT:-170};; esac
  timeout "$T" python3 -m bevdeploy.cli bench --model "$MODEL" --precisions $PRECISIONS --batch "${BATCH:-32}" \
    --data "$DATA" --calib "${CALIB:-synthetic2d:32}" > "$OUT/bench_$MODEL.txt" 2>&1
  echo "$MODEL bench rc=$?"
  grep -E "images/s|Error|error|Traceback" "$OUT/bench_$MODEL.txt" | tail -12
  cp bench/results/*/"$MODEL".json bench/results/*/"$MODEL".md "$OUT/" 2>/dev/null
done
