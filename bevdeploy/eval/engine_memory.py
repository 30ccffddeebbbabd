"""An engine's GPU memory as a serving process has it: the engine loaded and run in a fresh Python process.

The model tables used to read an engine row's memory in the benchmark's own process, after the PyTorch
row and the engine's build had run there: calibration on the float model, the export, the compile's
autotuning, and the libraries and workspaces they loaded (cuDNN's engines for the eager convs among them)
stayed charged to the engine. A user deploys the engine file in a process that never held the float
model. So each engine row is measured again here, in a child process that initialises CUDA, loads the
engine (compile, CUDA-graph capture), runs the row's inputs and reports the device memory it added.

The child's footprint is read as device-used memory (total - free, as nvidia-smi counts it: the child's
CUDA context, its weights, cached and graph-pool blocks, loaded kernels) less what was in use before it
started (the parent, idle while the child runs). The PyTorch row needs no child: it is the first thing the
benchmark process runs on the GPU.

Run as ``python -m bevdeploy.eval.engine_memory ENGINE INPUTS.pt [--iters N] [--device cuda|cpu]``; the
last line of its output is one JSON object. ``--device cpu`` runs the same steps without memory
readings (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

__all__ = ["fresh_process_memory", "main"]


def _device_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def fresh_process_memory(engine_path, inputs: dict[str, torch.Tensor], iters: int = 10, device: str = "cuda",
                         timeout: float = 900.0, stack_release: bool = False, env: dict[str, str] | None = None) -> dict:
    """Load and run ``engine_path`` on ``inputs`` in a child process; return its readings.

    Keys: ``memory_mb`` (device memory the child added: total - free at the end of its timed calls, less
    the used memory before it started), ``allocated_mb`` / ``peak_allocated_mb`` / ``reserved_mb`` (the
    child's allocator), ``context_mb`` (after CUDA's initialisation, before the engine), ``loaded_mb``
    (after the engine's load, compile and graph capture), ``allocated_loaded_mb`` / ``reserved_loaded_mb``
    (the allocator's share of that, GPU only), ``ms`` (the child's median latency, a check of the parent's).
    GPU readings are None with ``device="cpu"``.

    ``stack_release`` (GPU): after those readings the child also measures :meth:`Engine.release_stack`:
    ``stack_limit_kb`` / ``stack_reserved_mb`` (the CUDA stack limit the load left and the device memory it
    reserves), ``memory_after_stack_release_mb`` (as ``memory_mb``, after the release and timed calls
    again), ``ms_after_release``, ``stack_limit_after_release_kb``, ``outputs_equal_after_release`` and
    ``max_abs_diff_after_release``. If that step kills the child, the readings before it are returned with
    ``stack_release_error``.

    ``env``: variables set for the child only, on top of this process's (e.g. ``PYTORCH_CUDA_ALLOC_CONF``: the
    allocator reads it once, at CUDA's initialisation, so a serving configuration is measured in a fresh process;
    ``scripts/engine_memory_env.py`` compares several).

    Raises:
        RuntimeError: the child failed or timed out (its output's tail is in the message).
    """
    before = _device_used_mb() if device == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="bevdeploy-mem-") as tmp:
        inputs_path = os.path.join(tmp, "inputs.pt")
        torch.save({k: v.detach().cpu() for k, v in inputs.items()}, inputs_path)
        cmd = [sys.executable, "-m", "bevdeploy.eval.engine_memory", str(engine_path), inputs_path,
               "--iters", str(iters), "--device", device] + (["--stack-release"] if stack_release else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=None if env is None else {**os.environ, **env})
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"fresh-process memory of {engine_path}: no result in {timeout:.0f} s") from e
    readings = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    tail = (proc.stderr or proc.stdout).strip()[-1500:]
    if not readings or (proc.returncode != 0 and not stack_release):
        raise RuntimeError(f"fresh-process memory of {engine_path} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(readings[-1])
    if proc.returncode != 0:  # the readings were printed; the stack-release step after them failed
        result["stack_release_error"] = f"exit {proc.returncode}: {tail[-500:]}"
    if before is not None:
        if "device_used_after_release_mb" in result:
            result["memory_after_stack_release_mb"] = round(result.pop("device_used_after_release_mb") - before, 1)
        result["memory_mb"] = round(result.pop("device_used_mb") - before, 1)
        result["context_mb"] = round(result["context_mb"] - before, 1)
        result["loaded_mb"] = round(result["loaded_mb"] - before, 1)
    else:
        result.pop("device_used_mb", None)
        result["memory_mb"] = None
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bevdeploy.eval.engine_memory", description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("inputs", help="a torch.save'd dict of the engine's inputs (host tensors)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--stack-release", action="store_true",
                    help="after the timed calls: the CUDA stack reservation, then Engine.release_stack() and the "
                         "memory, latency and outputs again")
    args = ap.parse_args(argv)
    from bevdeploy.engine import Engine
    from bevdeploy.eval.bench_models import measure

    on_gpu = args.device == "cuda"
    if on_gpu:
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the context, before anything of the engine
        torch.cuda.synchronize()
    context = _device_used_mb() if on_gpu else None
    engine = Engine.load(args.engine, device=args.device)
    loaded = _device_used_mb() if on_gpu else None
    # what of the loaded footprint the allocator holds (weights, the graph's pool, cached blocks); the rest is
    # the context's: kernels' modules, library handles, the stack reservation
    allocator_loaded = (dict(allocated_loaded_mb=round(torch.cuda.memory_allocated() / 2**20, 1),
                             reserved_loaded_mb=round(torch.cuda.memory_reserved() / 2**20, 1)) if on_gpu else {})
    inputs = {k: v.to(args.device) for k, v in torch.load(args.inputs, weights_only=True).items()}
    if on_gpu:
        m = measure(lambda: engine(**inputs), iters=args.iters)
        result = dict(device_used_mb=m["memory_mb"], allocated_mb=m["allocated_mb"],
                      peak_allocated_mb=m["peak_allocated_mb"],
                      reserved_mb=round(torch.cuda.memory_reserved() / 2**20, 1), ms=round(m["ms"], 3))
    else:
        import statistics
        import time

        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            engine(**inputs)
            times.append((time.perf_counter() - t) * 1000.0)
        ms = statistics.median(times)
        result = dict(device_used_mb=None, allocated_mb=None, peak_allocated_mb=None, reserved_mb=None,
                      ms=round(ms, 3))
    result.update(context_mb=context, loaded_mb=loaded, outputs=sorted(engine.output_names), **allocator_loaded)
    print(json.dumps(result), flush=True)  # the readings stand even if the experiment below fails
    if on_gpu and args.stack_release:
        result.update(_stack_release(engine, inputs, args.iters))
        print(json.dumps(result), flush=True)
    return 0


def _stack_release(engine, inputs: dict[str, torch.Tensor], iters: int) -> dict:
    """What :meth:`Engine.release_stack` gives back in this process: the stack limit and its reservation
    before, the device memory and latency after (timed again), and whether the outputs stayed bit-equal."""
    from bevdeploy.engine.cuda_stack import reservation_mb
    from bevdeploy.eval.bench_models import measure

    ref = {k: v.clone() for k, v in engine(**inputs).items()}
    limits = engine.release_stack()
    if limits is None or limits["before_bytes"] is None:
        return dict(stack_release_error="no CUDA driver API (libcuda.so.1) in this process: nothing measured")
    m = measure(lambda: engine(**inputs), iters=iters)
    out = engine(**inputs)
    before, after = limits["before_bytes"], limits["after_bytes"]
    return dict(stack_limit_kb=before / 1024, stack_reserved_mb=round(reservation_mb(before), 1),
                stack_limit_after_release_kb=after / 1024, device_used_after_release_mb=m["memory_mb"],
                ms_after_release=round(m["ms"], 3),
                outputs_equal_after_release=all(torch.equal(ref[k], out[k]) for k in ref),
                max_abs_diff_after_release=max(float((ref[k] - out[k]).abs().max()) for k in ref))


if __name__ == "__main__":
    sys.exit(main())
