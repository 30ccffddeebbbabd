"""GPU: the int8 conv kernel with an input zero point against the same conv without one, same shapes, same
launch configs (the heuristic), CUDA graphs. With a zero point the padding holds its code (a masked load with
a non-zero fill). Asked because zero points made whole engines 31-37% slower on the H100 (CenterNet, YOLOX-x);
a per-kernel-point form (code 0 in the padding, per-tap weight sums subtracted inside the image) was timed by
this script at commit 865c29b and reverted (7-13x on YOLOX-x shapes; ``zero-point-conv-timing.md``).

    python scripts/zero_point_conv_timing.py [--out DIR]   -> zero-point-conv-timing.md under bench/results/<gpu>/
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bevdeploy.eval.timing import time_cuda_graph, write_gpu_result  # noqa: E402
from bevdeploy.quant.int8_kernels import int8_conv2d, weight_sums  # noqa: E402

# (label, N, C, H, W, O, k, stride, padding)
SHAPES = [
    ("YOLOX-x stage2 3x3 160ch 160x160, batch 32", 32, 160, 160, 160, 160, 3, 1, 1),
    ("YOLOX-x stage4 3x3 640ch 40x40, batch 32", 32, 640, 40, 40, 640, 3, 1, 1),
    ("CenterNet R18 layer1 3x3 64ch 128x128, batch 32", 32, 64, 128, 128, 64, 3, 1, 1),
    ("CenterNet R18 layer3 3x3 256ch 32x32, batch 32", 32, 256, 32, 32, 256, 3, 1, 1),
    ("R101 stage3 3x3 256ch 58x100, 6 cameras", 6, 256, 58, 100, 256, 3, 1, 1),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, n, c, h, w, o, k, s, pad in SHAPES:
        x = torch.randint(-128, 128, (n, c, h, w), generator=g, device="cuda", dtype=torch.int8)
        x = x.contiguous(memory_format=torch.channels_last)
        wq = torch.randint(-127, 128, (o, k, k, c), generator=g, device="cuda", dtype=torch.int8)
        ws = torch.rand(o, generator=g, device="cuda") * 1e-3 + 1e-4
        b = torch.randn(o, generator=g, device="cuda")
        forms = {"symmetric": dict(), "zero point": dict(x_zero_point=-128, w_sum=weight_sums(wq))}
        times = {}
        for name, kw in forms.items():
            fn = lambda kw=kw: int8_conv2d(x, wq, 0.02, ws, b, s, pad, activation="relu", out_scale=0.05, **kw)  # noqa: E731
            times[name] = time_cuda_graph(fn)
        sym, zp = times["symmetric"], times["zero point"]
        rows.append((label, sym, zp))
        print(f"{label}: sym {sym * 1e3:.1f} us, zero point {zp * 1e3:.1f} us ({zp / sym:.2f}x)", flush=True)
    lines = [f"# int8 conv with an input zero point ({torch.cuda.get_device_name()})", "",
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             "`python scripts/zero_point_conv_timing.py`; us per call, CUDA graph of 10 calls, median of 30 replays; "
             "bias + ReLU + int8 output epilogue; launch config from the heuristic (the same for both).", "",
             "| conv | symmetric us | zero point us | ratio |", "|---|---|---|---|"]
    for label, sym, zp in rows:
        lines.append(f"| {label} | {sym * 1e3:.1f} | {zp * 1e3:.1f} | {zp / sym:.2f} |")
    text = "\n".join(lines) + "\n"
    write_gpu_result("zero-point-conv-timing.md", text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
