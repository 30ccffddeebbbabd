"""GPU: what the fp16 engines' separate conv epilogues cost, and whether cuDNN's fused conv + bias (+ residual)
+ ReLU removes it. One ResNet-50 bottleneck of each stage at BEVFormer-tiny's feature sizes (6 cameras,
480x800 input), fp16 channels-last, each conv timed four ways in CUDA graphs:

* ``eager``: ``relu(conv2d(x, w, b) [+ z])`` as PyTorch runs it;
* ``inductor``: the same function under ``torch.compile`` (what an fp16 engine runs: the cuDNN conv or, for
  a 1x1, a cuBLAS GEMM, then one Triton pass for bias + residual + ReLU: the ``triton_poi_fused_add_
  convolution_relu`` kernels that take about a quarter of the tiny fp16x2 engine's GPU time,
  ``profile-bevformer-tiny-fp16x2.md``);
* ``cudnn fused``: ``torch.cudnn_convolution_add_relu`` / ``torch.cudnn_convolution_relu`` (cuDNN's fused
  graph: conv, bias, residual and ReLU in one kernel);
* ``conv alone``: ``conv2d(x, w)`` without bias or anything after it: the floor a fused epilogue approaches.

Each fused result is checked against ``eager`` (relative L2 error). The per-frame total weights each conv by how
often the tiny backbone runs it. The answer decides whether the fp16 engines route conv + epilogue through a
fused op (issue 12's "conv epilogues fused into the conv").

    python scripts/conv_epilogue_timing.py [--out DIR]   -> conv-epilogue-timing.md under bench/results/<gpu>/
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bevdeploy.eval.timing import time_cuda_graph, write_gpu_result  # noqa: E402

# (label, C_in, H, W, C_out, kernel, residual, calls per tiny frame[, stride]): the stem and the non-first
# blocks of each stage
SHAPES = [
    ("stem 7x7 3->64 stride 2", 3, 480, 800, 64, 7, False, 1, 2),
    ("stage1 conv1 1x1 256->64", 256, 120, 200, 64, 1, False, 2),
    ("stage1 conv2 3x3 64->64", 64, 120, 200, 64, 3, False, 3),
    ("stage1 conv3 1x1 64->256 +res", 64, 120, 200, 256, 1, True, 3),
    ("stage2 conv1 1x1 512->128", 512, 60, 100, 128, 1, False, 3),
    ("stage2 conv2 3x3 128->128", 128, 60, 100, 128, 3, False, 3),
    ("stage2 conv3 1x1 128->512 +res", 128, 60, 100, 512, 1, True, 4),
    ("stage3 conv1 1x1 1024->256", 1024, 30, 50, 256, 1, False, 5),
    ("stage3 conv2 3x3 256->256", 256, 30, 50, 256, 3, False, 5),
    ("stage3 conv3 1x1 256->1024 +res", 256, 30, 50, 1024, 1, True, 6),
    ("stage4 conv1 1x1 2048->512", 2048, 15, 25, 512, 1, False, 2),
    ("stage4 conv2 3x3 512->512", 512, 15, 25, 512, 3, False, 2),
    ("stage4 conv3 1x1 512->2048 +res", 512, 15, 25, 2048, 1, True, 3),
]
CAMERAS = 6


def _eager(x, w, b, z, pad, stride=1):
    y = F.conv2d(x, w, b, stride=stride, padding=pad)
    return torch.relu(y + z if z is not None else y)


def _fused(x, w, b, z, pad, stride=1):
    if z is None:
        return torch.cudnn_convolution_relu(x, w, b, [stride, stride], [pad, pad], [1, 1], 1)
    return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, [stride, stride], [pad, pad], [1, 1], 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one recompile per shape
    compiled = torch.compile(_eager, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = torch.channels_last
    rows = []
    t0 = time.perf_counter()
    for label, c, h, w_, o, k, res, calls, *rest in SHAPES:
        pad, st = k // 2, (rest[0] if rest else 1)
        ho, wo = (h + 2 * pad - k) // st + 1, (w_ + 2 * pad - k) // st + 1
        x = torch.randn(CAMERAS, c, h, w_, generator=g, device="cuda").half().contiguous(memory_format=cl)
        w = (torch.randn(o, c, k, k, generator=g, device="cuda") / (c * k * k) ** 0.5).half().contiguous(memory_format=cl)
        b = torch.randn(o, generator=g, device="cuda").half()
        z = torch.randn(CAMERAS, o, ho, wo, generator=g, device="cuda").half().contiguous(memory_format=cl) if res else None
        with torch.no_grad():
            ref = _eager(x, w, b, z, pad, st).float()
            errs = {}
            for name, fn in (("inductor", compiled), ("cudnn fused", _fused)):
                try:
                    y = fn(x, w, b, z, pad, st).float()
                    errs[name] = float((y - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("nan")
                except Exception as e:  # noqa: BLE001 (an unsupported fused form is a result too)
                    errs[name] = f"{type(e).__name__}: {str(e)[:120]}"
            ms = {"eager": time_cuda_graph(lambda: _eager(x, w, b, z, pad, st)),
                  "inductor": time_cuda_graph(lambda: compiled(x, w, b, z, pad, st)),
                  "conv alone": time_cuda_graph(lambda: F.conv2d(x, w, stride=st, padding=pad))}
            ms["cudnn fused"] = (time_cuda_graph(lambda: _fused(x, w, b, z, pad, st))
                                 if isinstance(errs["cudnn fused"], float) else None)
        rows.append((label, calls, ms, errs))
        print(f"{label}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in ms.items() if v is not None)
              + f"; err {errs} ({time.perf_counter() - t0:.0f} s)", flush=True)
    forms = ("eager", "inductor", "cudnn fused", "conv alone")
    lines = [f"# Conv epilogues: separate pass or fused ({torch.cuda.get_device_name()})", "",
             f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python scripts/conv_epilogue_timing.py`; "
             f"fp16 channels-last, {CAMERAS} cameras (BEVFormer-tiny's ResNet-50 at 480x800); us per call, CUDA graph "
             "of 10 calls, median of 30 replays; err = relative L2 error against eager.", "",
             "| conv | calls/frame | " + " | ".join(f"{f} us" for f in forms) + " | fused / inductor | err inductor | "
             "err cudnn fused |", "|---|---|" + "---|" * len(forms) + "---|---|---|"]
    totals = dict.fromkeys(forms, 0.0)
    for label, calls, ms, errs in rows:
        for f in forms:
            totals[f] = totals[f] + calls * ms[f] if ms.get(f) is not None and totals[f] is not None else None
        ratio = f"{ms['cudnn fused'] / ms['inductor']:.2f}" if ms.get("cudnn fused") else ""
        cells = [f"{ms[f] * 1e3:.1f}" if ms.get(f) is not None else "" for f in forms]
        err = [f"{e:.1e}" if isinstance(e, float) else e for e in (errs["inductor"], errs["cudnn fused"])]
        lines.append(f"| {label} | {calls} | " + " | ".join(cells) + f" | {ratio} | {err[0]} | {err[1]} |")
    lines.append(f"| **per tiny frame (these {len(rows)} convs x calls)** | | "
                 + " | ".join(f"**{t * 1e3:.0f}**" if t is not None else "" for t in totals.values()) + " | | | |")
    text = "\n".join(lines) + "\n"
    write_gpu_result("conv-epilogue-timing.md", text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
