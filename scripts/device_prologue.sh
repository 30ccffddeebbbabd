# Sourced first by every scripts/gpu_*.sh (repo root, after `set -uo pipefail`; set NEEDS before it to
# the Python modules the script cannot run without). On the lent GPU machine it:
#   - makes $OUT (default out) and puts the repo on PYTHONPATH, with compiled kernels off the interpreter
#     and the engine cache in /tmp (the machine's disk does not outlive the call's machine anyway);
#   - points builds at the committed int8 tuning cache (bench/autotune-cache.json, keyed by GPU, Triton
#     version and layer shape: shapes it holds are not timed again) and copies the updated cache to $OUT
#     at exit, to be committed;
#   - installs the carried wheels in .whl (nuscenes-devkit, pycocotools and their pure-Python
#     dependencies, cp312; the machine has no package index: pass carry: [".whl"] to the run) into
#     /tmp/site once per machine, and stops at once, naming the module, when one in NEEDS does not import
#     (session 10 lost a call minutes in: no synthetic world without the devkit).
OUT=${OUT:-out}; mkdir -p "$OUT"
# save_results: copy to $OUT/results only the bench/results files this call wrote (newer than this marker). Copying
# the whole folder went over the number of files a call may return, and session 16 lost a call's tables that way.
_RESULTS_MARK=$(mktemp); touch "$_RESULTS_MARK"
save_results() {
  find bench/results -type f -newer "$_RESULTS_MARK" 2>/dev/null | while read -r f; do
    mkdir -p "$OUT/results/$(dirname "${f#bench/results/}")" && cp "$f" "$OUT/results/${f#bench/results/}"
  done
}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export BEVDEPLOY_CACHE=${BEVDEPLOY_CACHE:-/tmp/bevcache}
export BEVDEPLOY_AUTOTUNE_CACHE=${BEVDEPLOY_AUTOTUNE_CACHE:-$PWD/bench/autotune-cache.json}
# pack_out: $OUT comes back as at most 8 files (device README), so at exit everything loose under it goes into one
# tarball (pack-<time>.tgz; a later script of the same call adds its own). Session 20 lost a call's tables to the
# count. Unpack here with `for f in FILES_AT/*.tgz; do tar xzf "$f"; done`.
pack_out() {
  (cd "$OUT" && files=$(find . -type f ! -name 'pack-*.tgz') && [ -n "$files" ] \
    && tar czf "pack-$(date +%s%N).tgz" $files && rm -f $files && find . -mindepth 1 -type d -empty -delete)
}
trap 'cp -f "$BEVDEPLOY_AUTOTUNE_CACHE" "$OUT/" 2>/dev/null; save_results; pack_out' EXIT
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.bevdeploy-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.bevdeploy-wheels
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
for module in ${NEEDS:-}; do
  if ! python3 -c "import $module" 2>/dev/null; then
    echo "ERROR: Python module '$module' does not import here: put its wheel (cp312) and its dependencies' in .whl" \
         "and carry .whl with the call (run's carry: [\".whl\"])" >&2
    exit 3
  fi
done
