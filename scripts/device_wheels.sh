# Sourced by the scripts/gpu_*.sh (repo root). The GPU machine has no package index: the wheels carried in
# .whl (nuscenes-devkit, pycocotools and their pure-Python dependencies, cp312; pass carry: [".whl"] to the
# device run) are installed into /tmp/site once per machine and put on PYTHONPATH. Modules named in NEEDS
# (set before sourcing) must then import, or the script stops here, saying what to carry, instead of
# failing minutes into a call (session 10 lost a call that way: no synthetic world without the devkit).
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.bevdeploy-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.bevdeploy-wheels
fi
[ -d /tmp/site ] && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site
for module in ${NEEDS:-}; do
  if ! python3 -c "import $module" 2>/dev/null; then
    echo "ERROR: Python module '$module' does not import here: put its wheel (cp312) and its dependencies' in .whl" \
         "and carry .whl with the call (run's carry: [\".whl\"])" >&2
    exit 3
  fi
done
