"""Sweep bev_pool_v2 launch settings at BEVDet-R50 shapes on the GPU (why is fp16 slower than fp32?).

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/sweep_bev_pool.py
"""

import itertools

import torch

from bevdeploy.eval.timing import time_cuda_graph
from bevdeploy.ops import bev_pool_v2 as bp

coor = bp.bevdet_like_geometry()
ranks_bev, ranks_depth, ranks_feat, starts, lengths = (t.cuda() for t in bp.bev_pool_v2_prepare(coor))
B, N, D, fH, fW, _ = coor.shape
depth = torch.randn(B, N, D, fH, fW, device="cuda").softmax(2)
feat = torch.randn(B, N, fH, fW, 64, device="cuda")
shape = (B, 1, 128, 128, 64)
default = bp._launch_config
for dtype, variant in [(torch.float32, "fp32"), (torch.float16, "fp16")]:
    d, f = depth.to(dtype), feat.to(dtype)
    for rows, warps in itertools.product((16, 32, 64), (2, 4, 8)):
        def cfg(num_intervals, num_points, C, elt_bytes, rows=rows, warps=warps):
            c = default(num_intervals, num_points, C, elt_bytes)
            block_j = min(rows, c["BLOCK_J"])
            c.update(WIDE_J=rows, BLOCK_J=block_j, BLOCK_I=max(1, rows // block_j), num_warps=warps)
            return c
        bp._launch_config = cfg
        try:
            ms = time_cuda_graph(lambda: bp.bev_pool_v2(d, f, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths, variant=variant))
            print(f"{variant} rows={rows} warps={warps}: {ms * 1e3:.1f} us")
        except Exception as e:  # a config that does not compile is reported, the sweep goes on
            print(f"{variant} rows={rows} warps={warps}: failed {type(e).__name__}: {str(e)[:80]}")
    bp._launch_config = default
