"""A quick self-check of the operator library: each op's kernels against its float64 reference.

Runs on whatever this machine has: the GPU (Triton kernels compiled for it) or, on a CPU-only
machine, Triton's interpreter (``bevdeploy demo`` sets ``TRITON_INTERPRET=1`` before importing the
ops). Small shapes, fresh random inputs; the same thresholds as the test suite. The tests are the
thorough version; this is what a user runs to see that the kernels work on their machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bevdeploy.ops._utils import interpreter_enabled, quantize_int8, use_triton

#: relative L2 error thresholds; int8 gets a bound from its quantisation step instead (see below).
REL_TOL = {"fp32": 1e-5, "fp16": 1e-3, "fp16x2": 5e-3, "int8": 2e-2}
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16}


def _store(x: torch.Tensor, variant: str):
    if variant == "int8":
        scale = x.abs().max().item() / 127.0
        q = quantize_int8(x, scale)
        return q, scale, q.double() * scale  # the reference sees what the kernel sees
    s = x.to(_FLOAT[variant])
    return s, None, s.double()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def _checks(device: torch.device, g: torch.Generator) -> list[tuple[str, str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]]:
    from bevdeploy.ops.bev_pool_v2 import bev_pool_v2, bev_pool_v2_prepare, scatter_add_reference
    from bevdeploy.ops.flash_attention import flash_attention
    from bevdeploy.ops.grid_sample import grid_sample
    from bevdeploy.ops.inverse import inverse
    from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d, quantize_weight_per_channel
    from bevdeploy.ops.modulated_deform_conv2d import reference as dcn_reference
    from bevdeploy.ops.msda import msda_fused
    from bevdeploy.ops.msda import reference as msda_reference
    from bevdeploy.ops.rotate import reference as rotate_reference
    from bevdeploy.ops.rotate import rotate
    from bevdeploy.ops.sca import reference as sca_reference
    from bevdeploy.ops.sca import sca_gathered

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def small(x, variant):
        return x.float() if variant == "fp32" else x.half()

    checks = []

    def add(op, variants, fn):
        for v in variants:
            checks.append((op, v, (lambda v=v: fn(v))))

    def c_grid(v):
        x = rnd(2, 5, 7, 9)
        grid = (torch.rand(2, 6, 5, 2, generator=g).to(device) * 2.2 - 1.1)
        xs, scale, x64 = _store(x, v)
        out = grid_sample(xs, small(grid, v), variant=v, input_scale=scale)
        ref = F.grid_sample(x64, small(grid, v).double(), align_corners=False)
        return out, ref

    def c_msda(v):
        shapes = [(5, 7), (3, 4)]
        B, Q, H, D, L, P, R = 2, 7, 3, 8, 2, 4, 2
        value = rnd(B, sum(h * w for h, w in shapes), H, D)
        ref_pts = torch.rand(B, Q, R, 2, generator=g).to(device)
        offsets = rnd(B, Q, H, L, P, 2) * 2
        logits = rnd(B, Q, H, L * P)
        vs, scale, v64 = _store(value, v)
        out = msda_fused(vs, shapes, small(ref_pts, v), small(offsets, v), small(logits, v), variant=v, value_scale=scale)
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64, device=device)
        loc = small(ref_pts, v).double()[:, :, None, None, torch.arange(P) % R, :] + small(offsets, v).double() / wh[:, None, :]
        w = small(logits, v).double().softmax(-1).view(B, Q, H, L, P)
        return out, msda_reference(v64, shapes, loc, w)

    def c_sca(v):
        shapes = [(5, 7), (3, 4)]
        B, N, Q, H, D, L, P, R = 1, 3, 11, 2, 8, 2, 4, 2
        value = rnd(B, N, sum(h * w for h, w in shapes), H, D)
        ref_pts = torch.rand(B, N, Q, R, 2, generator=g).to(device)
        mask = (torch.rand(B, N, Q, generator=g) < 0.5).to(device)
        mask[:, :, 0] = False  # a query no camera sees
        offsets = rnd(B, Q, H, L, P, 2) * 2
        logits = rnd(B, Q, H, L * P)
        vs, scale, v64 = _store(value, v)
        r, o, lg = small(ref_pts, v), small(offsets, v), small(logits, v)
        out = sca_gathered(vs, shapes, r, mask, o, lg, variant=v, value_scale=scale)
        return out, sca_reference(v64, shapes, r.double(), mask, o.double(), lg.double())

    def c_dcn(v):
        x, off, mask = rnd(2, 6, 7, 9), rnd(2, 18, 7, 9), torch.rand(2, 9, 7, 9, generator=g).to(device)
        weight, bias = rnd(5, 6, 3, 3) / 5, rnd(5)
        if v == "int8":
            xs, scale, x64 = _store(x, v)
            wq, ws = quantize_weight_per_channel(weight)
            out = modulated_deform_conv2d(xs, off.half(), mask.half(), wq, bias, 1, 1, 1, variant=v, input_scale=scale, weight_scale=ws)
            ref = dcn_reference(x64, off.half().double(), mask.half().double(), wq.double() * ws.double()[:, None, None, None], bias.double(), 1, 1, 1)
            return out, ref
        xs, _, x64 = _store(x, v)
        dt = _FLOAT[v]
        out = modulated_deform_conv2d(xs, off.to(dt), mask.to(dt), weight.to(dt), bias.to(dt), 1, 1, 1, variant=v)
        ref = dcn_reference(x64, off.to(dt).double(), mask.to(dt).double(), weight.to(dt).double(), bias.to(dt).double(), 1, 1, 1)
        return out, ref

    def c_rotate(v):
        x = rnd(3, 9, 11)
        angle = torch.tensor([17.0], device=device)
        xs, scale, x64 = _store(x, v)
        out = rotate(xs, angle, (4.0, 5.0), interpolation="bilinear", variant=v, img_scale=scale)
        return out, rotate_reference(x64, angle.double(), (4.0, 5.0), interpolation="bilinear")

    def c_inverse(v):
        m = rnd(6, 4, 4) + 4 * torch.eye(4, device=device)
        return inverse(m), torch.linalg.inv(m.double())

    def c_bev_pool(v):
        B, N, D, fH, fW, C = 1, 2, 5, 3, 7, 5
        grid = (1, 2, 9, 11)  # Z, Y, X with batch
        coor = torch.stack([torch.randint(0, n, (B, N, D, fH, fW), generator=g) for n in (11, 9, 2)], -1)
        ranks = bev_pool_v2_prepare(coor, grid_size=(11, 9, 2))
        ranks = [r.to(device) for r in ranks]
        ranks_bev, ranks_depth, ranks_feat, starts, lengths = ranks
        depth = torch.rand(B, N, D, fH, fW, generator=g).to(device)
        feat = rnd(B, N, fH, fW, C)
        shape = (B, 2, 9, 11, C)
        ds, dsc, d64 = _store(depth, v)
        fs, fsc, f64 = _store(feat, v)
        out = bev_pool_v2(ds, fs, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths, variant=v, depth_scale=dsc, feat_scale=fsc)
        ref = scatter_add_reference(d64, f64, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths)
        return out, ref

    def c_attention(v):
        q, k, vv = rnd(2, 3, 37, 8), rnd(2, 3, 19, 8), rnd(2, 3, 19, 8)
        (qs, qsc, q64), (ks, ksc, k64), (vs, vsc, v64) = _store(q, v), _store(k, v), _store(vv, v)
        out = flash_attention(qs, ks, vs, variant=v, q_scale=qsc, k_scale=ksc, v_scale=vsc)
        ref = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(8), -1) @ v64
        return out, ref

    variants = ("fp32", "fp16", "fp16x2", "int8")
    add("grid_sample", variants, c_grid)
    add("msda_fused", variants, c_msda)
    add("sca_gathered", variants, c_sca)
    add("modulated_deform_conv2d", variants, c_dcn)
    add("rotate", variants, c_rotate)
    add("inverse", ("fp32",), c_inverse)
    add("bev_pool_v2", variants, c_bev_pool)
    add("flash_attention", variants, c_attention)
    return checks


def run_checks(seed: int = 0) -> list[dict]:
    """Every op x variant on small random inputs; one row each with error, threshold and time."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    path = "triton" if use_triton(torch.empty(0, device=device)) else "reference"
    if device.type == "cpu" and interpreter_enabled():
        path = "triton (interpreter)"
    rows = []
    for op, variant, fn in _checks(device, g):
        t0 = time.perf_counter()
        try:
            out, ref = fn()
            err = _rel(out, ref)
            problem = ""
        except Exception as e:  # a failed check is reported, not raised: the table shows all ops
            err, problem = math.inf, f"{type(e).__name__}: {e}"
        rows.append({
            "op": op, "variant": variant, "device": device.type, "path": path, "rel_error": err,
            "threshold": REL_TOL[variant], "ok": err <= REL_TOL[variant], "seconds": time.perf_counter() - t0,
            "problem": problem,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<26}{'variant':<9}{'path':<22}{'rel. error':>12}{'threshold':>11}  result")
    for r in rows:
        verdict = "ok" if r["ok"] else "FAIL " + r["problem"][:80]
        print(f"{r['op']:<26}{r['variant']:<9}{r['path']:<22}{r['rel_error']:>12.2e}{r['threshold']:>11.0e}  {verdict}")
    ok = sum(r["ok"] for r in rows)
    print(f"{ok}/{len(rows)} checks passed")
