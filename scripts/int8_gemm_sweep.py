"""Where the int8 GEMM time of BEVFormer-base goes: one GPU run over its GEMM shapes and a wide config grid.

Session 7's profile of the base int8-fp16 engine put 6.9 ms of 22.3 in ``_int8_linear_kernel`` (127 calls:
the backbone's 1x1 convs on the NHWC view and the encoder's linears), about 260 TOPS on average against the
1164 measured for the same kernel on a long-K GEMM. Most of these GEMMs have K <= 512, so a tile runs two to
four MMA steps and then an epilogue that reads a residual and writes the output: the time should follow the
bytes, not the operations. For every shape this times (CUDA graphs, CUDA events, median):

* our kernel with the launch heuristic, with the build-time autotune's candidates, with a wide grid
  (tiles 64-256, BLOCK_K 64-256, 2-3 stages), and the persistent launch (1-3 programs per SM) of the
  grid's three fastest tiles; its epilogue as in the engine (bias, int8 residual, ReLU, int8 or fp16 out);
* ``torch._int_mm`` (cuBLASLt int8, int32 output, no epilogue) and cuBLAS fp16 ``addmm`` of the same shape;

and reports each against its own roofline: max(bytes / 3.35 TB/s, ops / 990 TOPS) (H100 SXM HBM3 and dense
int8 peak; ``--peak-tbps`` / ``--peak-tops`` for another card).

Usage (GPU): python scripts/int8_gemm_sweep.py [--out DIR] [--max-configs N]
Writes int8-gemm-sweep.{md,json} under bench/results/<gpu>/ and DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bevdeploy.eval.timing import gpu_dirname  # noqa: E402
from bevdeploy.quant.autotune import layer_candidates, time_in_graph  # noqa: E402
from bevdeploy.quant.int8_kernels import gemm_config, int8_linear  # noqa: E402

# (label, M, K, N, epilogue, calls per base frame). Epilogues: "res" = bias + int8 residual + ReLU + int8 out
# (a bottleneck's conv3), "relu8" = bias + ReLU + int8 out (conv1), "fp16" = bias, fp16 out (a linear whose
# consumer is float). Base: 6 cameras at 928x1600, R101 strides 4/8/16/32, BEV 200x200, 4 SCA levels.
SHAPES = [
    ("stage3 conv3 256->1024 +res", 6 * 58 * 100, 256, 1024, "res", 23),
    ("stage3 conv1 1024->256", 6 * 58 * 100, 1024, 256, "relu8", 22),
    ("SCA value_proj 256->256", 6 * (116 * 200 + 58 * 100 + 29 * 50 + 15 * 25), 256, 256, "fp16", 6),
    ("TSA value_proj 256->256", 2 * 40000, 256, 256, "fp16", 6),
    ("SCA offsets 256->512", 40000, 256, 512, "fp16", 6),
    ("TSA offsets 512->128", 2 * 40000, 512, 128, "fp16", 6),
    ("FFN 256->512 relu", 40000, 256, 512, "relu8", 6),
    ("FFN 512->256", 40000, 512, 256, "fp16", 6),
    ("output_proj 256->256", 40000, 256, 256, "fp16", 12),
    ("stage1 conv3 64->256 +res", 6 * 232 * 400, 64, 256, "res", 3),
    ("stage1 conv1 256->64", 6 * 232 * 400, 256, 64, "relu8", 2),
    ("stage2 conv3 128->512 +res", 6 * 116 * 200, 128, 512, "res", 4),
    ("stage2 conv1 512->128", 6 * 116 * 200, 512, 128, "relu8", 3),
    ("stage4 conv3 512->2048 +res", 6 * 29 * 50, 512, 2048, "res", 3),
    ("stage4 conv1 2048->512", 6 * 29 * 50, 2048, 512, "relu8", 2),
]


def grid() -> list[tuple[int, int, int, int, int, int]]:
    out = []
    for bm in (64, 128, 256):
        for bn in (64, 128, 256):
            for bk in (64, 128, 256):
                for stages in (2, 3):
                    if (bm + bn) * bk * stages > 200 * 1024 or bm * bn > 128 * 256 or (bk == 256 and stages > 2):
                        continue
                    out.append((bm, bn, bk, 8, 8 if bm * bn >= 128 * 128 else 4, stages))
    return out


def bytes_moved(m, k, n, epilogue) -> int:
    out = m * n * (2 if epilogue == "fp16" else 1)
    res = m * n if epilogue == "res" else 0
    return m * k + n * k + out + res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--max-configs", type=int, default=0, help="time only the first N grid configs (0: all)")
    ap.add_argument("--peak-tbps", type=float, default=3.35)
    ap.add_argument("--peak-tops", type=float, default=990.0)
    ap.add_argument("--shapes", default="", help="comma-separated indices into the shape list (default: all)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("int8_gemm_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    configs = grid()
    if args.max_configs:
        configs = configs[: args.max_configs]
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows, t0 = [], time.time()
    for label, m, k, n, epi, calls in shapes:
        x = torch.randint(-127, 128, (m, k), generator=g, device=dev, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, device=dev, dtype=torch.int8)
        ws = torch.rand(n, generator=g, device=dev) * 1e-3 + 1e-4
        bias = torch.randn(n, generator=g, device=dev)
        kw = dict(activation="none", out_dtype=torch.float16)
        if epi == "res":
            kw = dict(residual=torch.randint(-127, 128, (m, n), generator=g, device=dev, dtype=torch.int8),
                      residual_scale=0.02, activation="relu", out_scale=0.05)
        elif epi == "relu8":
            kw = dict(activation="relu", out_scale=0.05)

        def ours(cfg):
            return lambda: int8_linear(x, w, 0.02, ws, bias, config=cfg, **kw)

        timed = {}
        heur = gemm_config(m, n, k, dev)
        tune = layer_candidates(m, n, k, dev)
        fitting = [c for c in configs if c[2] <= max(64, k) and c[1] <= max(64, 2 * n) and (c[2] < 256 or k <= 512)]
        for cfg in [heur] + tune + fitting:
            if cfg in timed:
                continue
            try:
                timed[cfg] = time_in_graph(ours(cfg), calls=10, replays=7)
            except Exception as e:  # noqa: BLE001  (out of shared memory / registers on this GPU)
                timed[cfg] = float("nan")
                print(f"  {label}: {cfg} failed: {type(e).__name__}", file=sys.stderr)
        ok = {c: t for c, t in timed.items() if t == t}
        # the persistent launch (config[6] programs per SM) of the three fastest tiles
        for cfg in sorted(ok, key=ok.get)[:3]:
            for per_sm in (1, 2, 3):
                p = (*cfg[:6], per_sm)
                try:
                    timed[p] = time_in_graph(ours(p), calls=10, replays=7)
                except Exception as e:  # noqa: BLE001
                    timed[p] = float("nan")
                    print(f"  {label}: {p} failed: {type(e).__name__}", file=sys.stderr)
        ok = {c: t for c, t in timed.items() if t == t}
        persistent = {c: t for c, t in ok.items() if len(c) == 7}
        best = min(ok, key=ok.get)
        tune_best = min((c for c in tune if c in ok), key=ok.get)
        # the same best config with the residual read after the K loop (the kernels before the preload)
        no_preload_us = float("nan")
        if epi == "res":
            import bevdeploy.quant.int8_kernels as k8

            saved, k8._PRELOAD_BYTES_PER_THREAD = k8._PRELOAD_BYTES_PER_THREAD, 0
            try:
                no_preload_us = time_in_graph(ours(best), calls=10, replays=7)
            finally:
                k8._PRELOAD_BYTES_PER_THREAD = saved
        wt = w.t()  # [K, N] column-major: cuBLASLt's int8 TN layout
        int_mm_us = time_in_graph(lambda: torch._int_mm(x, wt), calls=10, replays=7)
        xh, wh, bh = x.half(), w.half(), bias.half()
        fp16_us = time_in_graph(lambda: torch.addmm(bh, xh, wh.t()), calls=10, replays=7)
        ops = 2.0 * m * n * k
        nbytes = bytes_moved(m, k, n, epi)
        roof_us = max(nbytes / (args.peak_tbps * 1e12), ops / (args.peak_tops * 1e12)) * 1e6
        row = dict(label=label, m=m, k=k, n=n, epilogue=epi, calls=calls, heuristic=list(heur),
                   heuristic_us=ok.get(heur, float("nan")), autotune_best=list(tune_best), autotune_us=ok[tune_best],
                   grid_best=list(best), grid_us=ok[best], no_preload_us=no_preload_us, int_mm_us=int_mm_us, fp16_addmm_us=fp16_us,
                   roofline_us=roof_us, mbytes=nbytes / 1e6, gop=ops / 1e9,
                   persistent_best=list(min(persistent, key=persistent.get)) if persistent else None,
                   persistent_us=min(persistent.values()) if persistent else float("nan"),
                   top5=[[list(c), ok[c]] for c in sorted(ok, key=ok.get)[:5]])
        rows.append(row)
        write(rows, args)
        print(f"[{time.time() - t0:.0f} s] {label}: heur {row['heuristic_us']:.1f} autotune {row['autotune_us']:.1f} "
              f"grid {row['grid_us']:.1f} {best} | _int_mm {int_mm_us:.1f} fp16 {fp16_us:.1f} | roof {roof_us:.1f} us",
              flush=True)
    return 0


def write(rows, args) -> None:
    """The table so far (a run cut by its time limit keeps the shapes it finished)."""
    name = torch.cuda.get_device_name()
    md = [f"# int8 GEMM sweep at BEVFormer-base shapes ({name}, torch {torch.__version__})", "",
          "`python scripts/int8_gemm_sweep.py`; us per call (CUDA graph of 10 calls, median of 7 replays); roofline = "
          f"max(bytes / {args.peak_tbps} TB/s, ops / {args.peak_tops} TOPS); `_int_mm` = cuBLASLt int8 without "
          "epilogue (int32 out); fp16 = cuBLAS addmm. calls = per base frame.", "",
          "| GEMM | M | K | N | epilogue | calls | heuristic us | autotune us | persistent us | grid best us | grid best config | same, residual read late us | "
          "_int_mm us | fp16 us | roofline us | grid best / roofline |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['label']} | {r['m']} | {r['k']} | {r['n']} | {r['epilogue']} | {r['calls']} | "
                  f"{r['heuristic_us']:.1f} | {r['autotune_us']:.1f} | {r['persistent_us']:.1f} | {r['grid_us']:.1f} | {tuple(r['grid_best'])} | {r['no_preload_us']:.1f} | "
                  f"{r['int_mm_us']:.1f} | {r['fp16_addmm_us']:.1f} | {r['roofline_us']:.1f} | "
                  f"{r['grid_us'] / r['roofline_us']:.2f} |")
    tot = {key: sum(r[key] * r["calls"] for r in rows) / 1000 for key in
           ("heuristic_us", "autotune_us", "persistent_us", "grid_us", "int_mm_us", "fp16_addmm_us", "roofline_us")}
    md += ["", "Per frame (x calls), ms: " + ", ".join(f"{k.replace('_us', '')} {v:.3f}" for k, v in tot.items())]
    text = "\n".join(md) + "\n"

    dst = os.path.join("bench", "results", gpu_dirname())
    for d in (dst, args.out):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "int8-gemm-sweep.md"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "int8-gemm-sweep.json"), "w") as f:
            json.dump(dict(device=name, rows=rows, per_frame_ms=tot), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
