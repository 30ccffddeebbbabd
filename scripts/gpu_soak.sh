#!/usr/bin/env bash
# 2000-step soak of the BEVFormer-tiny engine (fp16x2) with a scene change every 40 steps: device
# memory flat after warm-up (< 1 MB) and every scene's first frame reset. <= 4 min on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=$PWD timeout 240 python scripts/gpu_soak.py --steps 2000 --scene-len 40 --precision fp16x2 "$@"
