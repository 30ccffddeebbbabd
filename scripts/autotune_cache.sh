# Sourced by the scripts/gpu_*.sh (repo root, after OUT is set). The int8 launch choices of earlier
# device runs are committed in bench/autotune-cache.json (keyed by GPU, Triton version and layer
# shape): builds do not time the shapes it holds again, and the updated cache comes back in $OUT at
# exit, to be committed.
export BEVDEPLOY_AUTOTUNE_CACHE=${BEVDEPLOY_AUTOTUNE_CACHE:-$PWD/bench/autotune-cache.json}
trap 'cp -f "$BEVDEPLOY_AUTOTUNE_CACHE" "$OUT/" 2>/dev/null' EXIT
