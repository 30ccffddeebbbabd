"""One engine's serving memory under several process environments (issue 12's memory target), each in a
fresh process (``bevdeploy.eval.engine_memory.fresh_process_memory``): the allocator and cuDNN read these
settings once, at start-up, so they cannot be compared inside one process.

Why: BEVFormer-base's fp16x2 engine held 1510 MB reserved against 312 MB allocated after its load in a fresh
process (H100, ``bench/results/nvidia-h100-80gb-hbm3/bevformer-base-memory.md``): the CUDA graph's pool, cached
blocks, and workspaces the capture kept. The variants:

* ``default``: the environment as it is;
* ``expandable``: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (segments grow in place instead of new
  blocks per size class: less fragmentation);
* ``cudnn-ws-64``: ``CUDNN_CONV_WSCAP_DBG=64`` (PyTorch caps each cuDNN conv's workspace at 64 MiB; workspaces
  allocated during the graph capture stay in its pool);
* ``both``: the two together.

Usage (GPU; the engine built before, e.g. by ``bevdeploy build`` or a bench row in ``$BEVDEPLOY_CACHE``)::

    python scripts/engine_memory_env.py ENGINE [--variants default expandable cudnn-ws-64 both] [--iters 20]
        [--out bench/results] [--name bevformer-base-fp16x2-memory-env]

Writes ``<out>/<gpu>/<name>.{json,md}`` after every variant (a cut run keeps what it measured): memory_mb
(device memory the child added), the allocator's reserved / allocated after the load, the context, and the
child's latency (a setting that costs speed shows here). Inputs: the engine's own example (zeros, identity
``lidar2img``; all-zero BEVDet indices are an empty pooling): memory does not depend on the values.
``--device cpu`` runs the same steps without readings (the test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "default": {},
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "cudnn-ws-64": {"CUDNN_CONV_WSCAP_DBG": "64"},
    "both": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDNN_CONV_WSCAP_DBG": "64"},
}
COLUMNS = ("variant", "env", "memory_mb", "reserved_loaded_mb", "allocated_loaded_mb", "context_mb", "loaded_mb",
           "peak_allocated_mb", "ms")


def markdown(doc: dict) -> str:
    lines = [f"# {doc['name']} on {doc['device']}", "", f"Engine `{doc['engine']}`; command: `{doc['command']}`",
             "", "Each row: the engine loaded and run in a fresh process with that environment (memory_mb: the "
             "device memory the process added, CUDA context included; the allocator's reserved / allocated "
             "after the load; ms: the child's median latency).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default=None, help="results stem (default: <engine stem>-memory-env)")
    args = ap.parse_args(argv)
    from bevdeploy.engine.engine import example_inputs, input_spec, read_metadata
    from bevdeploy.eval.engine_memory import fresh_process_memory
    from bevdeploy.eval.timing import gpu_dirname

    engine = Path(args.engine)
    if not engine.is_file():
        ap.error(f"no engine file at {engine}")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out_dir = Path(args.out) / (gpu_dirname() if args.device == "cuda" else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{engine.stem}-memory-env"
    doc = {"name": name, "device": gpu, "engine": engine.name, "torch": torch.__version__,
           "command": "python scripts/engine_memory_env.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": []}
    inputs = example_inputs(input_spec(read_metadata(engine)[1]))
    for variant in args.variants:
        env = VARIANTS[variant]
        t0 = time.perf_counter()
        r = fresh_process_memory(engine, inputs, iters=args.iters, device=args.device, env=env)
        row = {"variant": variant, "env": " ".join(f"{k}={v}" for k, v in env.items()) or "-",
               **{c: r.get(c) for c in COLUMNS[2:]}}
        doc["rows"].append(row)
        (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out_dir / f"{name}.md").write_text(markdown(doc))
        print(f"{variant}: memory {row['memory_mb']} MB, reserved after load {row['reserved_loaded_mb']} MB, "
              f"{row['ms']} ms ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
