"""Time one engine under compiler settings and list the kernels that take its time (GPU).

    python scripts/profile_engine.py ENGINE [--no-freezing] [--cudnn-benchmark] [--top 25]

Loads ENGINE (Inductor + CUDA graphs), times replays with CUDA events (median of 50 after warm-up) on
random inputs of the engine's spec, then profiles 10 calls with torch.profiler and prints the
kernels by total CUDA time. Used to decide what to optimise; the tables come from ``bevdeploy bench``.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--no-freezing", action="store_true", help="Engine.load(freeze=False)")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from bevdeploy.engine import Engine
    from bevdeploy.eval.timing import time_eager

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    t0 = time.time()
    engine = Engine.load(args.engine, device="cuda", freeze=not args.no_freezing)
    load_s = time.time() - t0
    inputs = engine._example()
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, v in inputs.items():
        if v.is_floating_point() and k not in ("lidar2img", "use_prev_bev", "can_bus"):
            v.copy_(torch.randn(v.shape, device="cuda", generator=g))
    ms = time_eager(lambda: engine(**inputs), iters=50, warmup=5)
    print(f"{engine}: load+compile {load_s:.1f} s, {ms:.3f} ms/frame ({1000 / ms:.1f} FPS) "
          f"freezing={not args.no_freezing} cudnn.benchmark={args.cudnn_benchmark}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine(**inputs)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
