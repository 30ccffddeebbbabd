import io

import pytest
import torch

from bevdeploy.ops._utils import quantize_int8
from bevdeploy.ops.bev_pool_v2 import (
    BEVPoolV2,
    _bev_pool_v2_triton,
    _launch_config,
    bev_pool_v2,
    bev_pool_v2_prepare,
    bevdet_like_geometry,
    reference,
    scatter_add_reference,
)
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16}
GRID = (11, 9, 2)  # X, Y, Z cells


def _problem(device, *, B=1, N=2, D=5, fH=3, fW=7, C=5, grid=GRID, hot=0.0, order="length", seed=0):
    """Random voxel indices (some outside the grid); a fraction ``hot`` of the points in 2 voxels (long intervals)."""
    g = torch.Generator().manual_seed(seed)
    coor = torch.stack([torch.randint(-1, n + 1, (B, N, D, fH, fW), generator=g) for n in grid], -1)
    if hot:
        pick = torch.rand(B, N, D, fH, fW, generator=g) < hot
        cell = torch.tensor([[3, 4, 1], [5, 4, 1]])[torch.randint(0, 2, (B, N, D, fH, fW), generator=g)]
        coor = torch.where(pick.unsqueeze(-1), cell, coor)
    ranks = [r.to(device) for r in bev_pool_v2_prepare(coor, grid_size=grid, interval_order=order)]
    depth = torch.rand(B, N, D, fH, fW, generator=g).softmax(2).to(device)
    feat = torch.randn(B, N, fH, fW, C, generator=g).to(device)
    shape = (B, grid[2], grid[1], grid[0], C)
    return depth, feat, ranks, shape


def _run(depth, feat, ranks, shape, variant, **scales):
    """The Triton launcher into a NaN-poisoned channels-last buffer."""
    ranks_bev, ranks_depth, ranks_feat, starts, lengths = ranks
    B, Z, Y, X, C = shape
    out = poisoned((B, Z, Y, X, C), torch.float32 if variant == "fp32" else torch.float16, feat.device)
    res = _bev_pool_v2_triton(
        depth, feat, ranks_depth, ranks_feat, ranks_bev, starts, lengths, shape, variant, out=out, **scales
    )
    assert res.data_ptr() == out.data_ptr() and res.shape == (B, C, Z, Y, X)
    return res


def _oracle(depth, feat, ranks, shape):
    ranks_bev, ranks_depth, ranks_feat, _, _ = ranks
    return scatter_add_reference(depth.double(), feat.double(), ranks_depth, ranks_feat, ranks_bev, shape)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2"])
@pytest.mark.parametrize(
    "case",
    [
        dict(),  # short intervals, packed programs
        dict(B=2, order="bev"),
        dict(D=16, hot=0.6, C=3),  # two intervals of ~200 points: multi-step wide programs
        dict(D=16, hot=0.6, order="bev", C=8),  # the same inside packed programs
    ],
    ids=["short", "batch2-bev-order", "long-wide", "long-packed"],
)
def test_triton_matches_scatter_add(device, variant, case):
    depth, feat, ranks, shape = _problem(device, **case)
    ds, fs = depth.to(STORAGE[variant]), feat.to(STORAGE[variant])
    out = _run(ds, fs, ranks, shape, variant)
    ref = _oracle(ds, fs, ranks, shape)
    assert_rel_close(out, ref, REL_TOL[variant])
    # voxels no interval names are exactly 0 (the poison is overwritten)
    empty = ref.abs().sum(1, keepdim=True).expand_as(ref) == 0
    assert empty.any() and (out[empty] == 0).all()


def test_long_intervals_take_several_steps():
    # The "long" cases above must exercise the loops: intervals longer than a wide step, inside
    # wide programs (length order) and inside packed programs (voxel order).
    for order, C in (("length", 3), ("bev", 8)):
        _, _, (rb, rd, rf, starts, lengths), _ = _problem("cpu", D=16, hot=0.6, C=C, order=order)
        cfg = _launch_config(starts.numel(), rd.numel(), C, 4)
        longest = int(lengths.argmax())
        assert lengths[longest] > cfg["WIDE_J"] and lengths.min() == 1
        assert (longest < cfg["n_wide"]) == (order == "length")


def test_c64_full_channel_vector(device):
    # BEVDet's C=64: the channel vector needs no mask; mixed lengths, both program kinds.
    depth, feat, ranks, shape = _problem(device, N=1, D=8, C=64, hot=0.2)
    out = _run(depth, feat, ranks, shape, "fp32")
    assert_rel_close(out, _oracle(depth, feat, ranks, shape), REL_TOL["fp32"])


def test_int8_bounded_by_scales(device):
    depth, feat, ranks, shape = _problem(device, D=9, hot=0.2)
    d_scale, f_scale = depth.abs().max().item() / 127, feat.abs().max().item() / 127
    dq, fq = quantize_int8(depth, d_scale), quantize_int8(feat, f_scale)
    out = _run(dq, fq, ranks, shape, "int8", depth_scale=d_scale, feat_scale=f_scale)
    assert out.dtype == torch.float16
    # Against the dequantised inputs: exact integer products summed in fp32, then one fp16 rounding.
    deq = _oracle(dq.double() * d_scale, fq.double() * f_scale, ranks, shape)
    assert_int8_close(out, deq, deq.abs().max().item() * 2.0**-11 + 1e-6)
    # Against the float inputs: per point |d f - d' f'| <= |d| f_scale/2 + |f'| d_scale/2, summed per voxel.
    ranks_bev, ranks_depth, ranks_feat, _, _ = ranks
    d64 = depth.double().flatten()[ranks_depth.long()]
    f64 = (fq.double() * f_scale).reshape(-1, shape[-1])[ranks_feat.long()]
    per_point = d64.abs()[:, None] * f_scale / 2 + f64.abs() * d_scale / 2
    B, Z, Y, X, C = shape
    bound = per_point.new_zeros(B * Z * Y * X, C).index_add_(0, ranks_bev.long(), per_point)
    bound = bound.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3) * (1 + 2.0**-10) + 1e-4
    err = (out.double() - _oracle(depth, feat, ranks, shape)).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_points_outside_every_interval_are_dropped(device):
    # Drop one interval: its voxel stays 0 and its points count nowhere (BEVDet's semantics).
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem(device)
    ranks = (rb, rd, rf, starts[1:], lengths[1:])
    out = _run(depth, feat, ranks, shape, "fp32")
    ref = reference(depth.double(), feat.double(), rd, rf, rb, starts[1:], lengths[1:], shape)
    assert_rel_close(out, ref, REL_TOL["fp32"])
    want = _oracle(depth, feat, (rb, rd, rf, starts, lengths), shape).permute(0, 2, 3, 4, 1).reshape(-1, shape[4])
    assert want[rb[starts[0]]].abs().sum() > 0
    want[rb[starts[0]]] = 0
    assert_rel_close(ref.permute(0, 2, 3, 4, 1).reshape(-1, shape[4]), want, 1e-12)


def test_no_intervals_gives_zeros(device):
    depth, feat, _, shape = _problem(device)
    empty = [torch.zeros(0, dtype=torch.int32, device=device)] * 5
    out = _run(depth, feat, empty, shape, "fp32")
    assert (out == 0).all()


def test_non_contiguous_inputs(device):
    B, N, D, fH, fW, C = 1, 2, 5, 3, 7, 6
    depth, _, ranks, shape = _problem(device, C=C)
    g = torch.Generator().manual_seed(1)
    # feat sliced out of a channels-last depth-net output and permuted as BEVDet does: read in place
    net = torch.randn(B * N, D + C, fH, fW, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    feat_cl = net[:, D:].view(B, N, C, fH, fW).permute(0, 1, 3, 4, 2)
    # feat permuted from a contiguous [B, N, C, fH, fW]: copied
    feat_nc = torch.randn(B, N, C, fH, fW, generator=g).to(device).permute(0, 1, 3, 4, 2)
    depth_nc = torch.rand(B, N, fH, fW, D, generator=g).to(device).permute(0, 1, 4, 2, 3)
    rb, rd, rf, starts, lengths = ranks
    stacked = torch.stack([rb, rd, rf], 1)  # columns of a [P, 3] tensor: stride 3
    ranks_nc = (stacked[:, 0], stacked[:, 1], stacked[:, 2], starts, lengths)
    for feat in (feat_cl, feat_nc):
        assert not feat.is_contiguous()
        out = _run(depth_nc, feat, ranks_nc, shape, "fp32")
        assert_rel_close(out, _oracle(depth_nc, feat, ranks, shape), REL_TOL["fp32"])


def test_public_function_module_and_layout(device):
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem(device)
    B, Z, Y, X, C = shape
    out = bev_pool_v2(depth, feat, rd, rf, rb, shape, starts, lengths)
    assert out.shape == (B, C, Z, Y, X) and out.stride() == (Z * Y * X * C, 1, Y * X * C, X * C, C)
    assert_rel_close(out, _oracle(depth, feat, (rb, rd, rf, starts, lengths), shape), REL_TOL["fp32"])
    mod = BEVPoolV2(shape)
    assert "bev_feat_shape=(1, 2, 9, 11, 5)" in repr(mod)
    out16 = mod(depth.half(), feat.half(), rd, rf, rb, starts, lengths, variant="fp16x2")
    assert out16.dtype == torch.float16
    assert_rel_close(out16, _oracle(depth.half(), feat.half(), (rb, rd, rf, starts, lengths), shape), REL_TOL["fp16x2"])


def test_reference_matches_scatter_add():
    for case in (dict(), dict(B=2, hot=0.3, order="bev")):
        depth, feat, (rb, rd, rf, starts, lengths), shape = _problem("cpu", **case)
        ref = reference(depth.double(), feat.double(), rd, rf, rb, starts, lengths, shape)
        assert ref.dtype == torch.float64
        assert_rel_close(ref, _oracle(depth, feat, (rb, rd, rf, starts, lengths), shape), 1e-12)


# ------------------------------------------------------------------------------------- prepare


def _brute_force_groups(voxel, grid):
    """cell -> [(ranks_depth, ranks_feat), ...] in frustum order, by plain Python loops."""
    B, N, D, H, W, _ = voxel.shape
    X, Y, Z = grid
    groups = {}
    for b in range(B):
        for n in range(N):
            for d in range(D):
                for h in range(H):
                    for w in range(W):
                        x, y, z = (int(v) for v in voxel[b, n, d, h, w])
                        if 0 <= x < X and 0 <= y < Y and 0 <= z < Z:
                            cell = ((b * Z + z) * Y + y) * X + x
                            point = (((b * N + n) * D + d) * H + h) * W + w
                            pixel = ((b * N + n) * H + h) * W + w
                            groups.setdefault(cell, []).append((point, pixel))
    return groups


def _assert_prepare_matches(ranks, groups, order):
    rb, rd, rf, starts, lengths = (r.tolist() for r in ranks)
    assert all(r.dtype == torch.int32 and r.is_contiguous() for r in ranks)
    assert rb == sorted(rb) and len(rb) == sum(len(v) for v in groups.values())
    assert len(starts) == len(groups) and sum(lengths) == len(rb)
    for s, n in zip(starts, lengths):
        cell = rb[s]
        assert rb[s : s + n] == [cell] * n
        assert list(zip(rd[s : s + n], rf[s : s + n])) == groups[cell]
    if order == "bev":
        assert starts == sorted(starts)
    else:  # longest first, in units of the packed step, voxel order among equals
        step = _launch_config(len(starts), len(rb), 64, 2)["BLOCK_J"]
        units = [-(-n // step) for n in lengths]
        assert units == sorted(units, reverse=True)


@pytest.mark.parametrize("order", ["bev", "length"])
def test_prepare_matches_brute_force(order):
    g = torch.Generator().manual_seed(3)
    voxel = torch.stack([torch.randint(-2, n + 2, (2, 2, 4, 3, 5), generator=g) for n in GRID], -1)
    voxel[0, 0, :, 0, 0] = torch.tensor([4, 4, 1])  # one long interval
    ranks = bev_pool_v2_prepare(voxel, grid_size=GRID, interval_order=order)
    _assert_prepare_matches(ranks, _brute_force_groups(voxel, GRID), order)


def test_prepare_metric_coordinates_truncate_like_bevdet():
    g = torch.Generator().manual_seed(4)
    lower, step, grid = (-4.0, -3.0, -1.0), (0.8, 0.5, 1.0), (10, 12, 2)
    coor = torch.rand(1, 3, 4, 2, 5, 3, generator=g) * torch.tensor([9.0, 7.0, 3.0]) + torch.tensor([-4.5, -3.5, -1.5])
    ranks = bev_pool_v2_prepare(coor, lower, step, grid, interval_order="bev")
    # BEVDet: ((coor - lower) / interval).long(), float32 math, truncation toward zero
    voxel = ((coor - torch.tensor(lower)) / torch.tensor(step)).long()
    assert ((coor[..., 0] - lower[0]) / step[0] > -1).logical_and((coor[..., 0] - lower[0]) / step[0] < 0).any()
    _assert_prepare_matches(ranks, _brute_force_groups(voxel, grid), "bev")


def test_prepare_nothing_inside():
    ranks = bev_pool_v2_prepare(torch.full((1, 1, 2, 2, 2, 3), 1000.0))
    assert all(r.numel() == 0 and r.dtype == torch.int32 for r in ranks)


def test_bevdet_like_geometry():
    coor = bevdet_like_geometry()
    assert coor.shape == (1, 6, 59, 16, 44, 3) and coor.dtype == torch.float32
    assert torch.isfinite(coor).all()
    rb, rd, rf, starts, lengths = bev_pool_v2_prepare(coor)
    # The reference system's BEVDet-R50 engine: 179520 points, 11398 intervals.
    assert 150_000 < rb.numel() < 220_000 and 9_000 < starts.numel() < 14_000
    assert not torch.equal(bevdet_like_geometry(seed=1), coor)


# ------------------------------------------------------------------------------ checks, export


def _args():
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem("cpu")
    return dict(depth=depth, feat=feat, ranks_depth=rd, ranks_feat=rf, ranks_bev=rb, bev_feat_shape=shape,
                interval_starts=starts, interval_lengths=lengths)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(feat=a["feat"][0]), r"feat must have shape \[B, N, fH, fW, C\]"),
        (lambda a: a.update(depth=a["depth"][..., 0]), r"depth must have shape \[B, N, D, fH, fW\]"),
        (lambda a: a.update(depth=a["depth"].half()), r"takes depth as torch.float32"),
        (lambda a: a.update(feat=a["feat"].double(), depth=a["depth"].double()), r"feat must be float32, float16"),
        (lambda a: a.update(depth=a["depth"][:, :, :, :2]), r"depth: dim 3 \(fH\)"),
        (lambda a: a.update(ranks_depth=a["ranks_depth"].long()), r"ranks_depth must have dtype"),
        (lambda a: a.update(ranks_feat=a["ranks_feat"][1:]), r"ranks_feat must have shape \[\d+\]"),
        (lambda a: a.update(interval_lengths=a["interval_lengths"][1:]), r"interval_lengths must have shape"),
        (lambda a: a.update(bev_feat_shape=(1, 2, 9, 11)), r"bev_feat_shape must be 5 positive ints"),
        (lambda a: a.update(bev_feat_shape=(1, 2, 9, 11, 4)), r"bev_feat_shape: C \(dim 4"),
        (lambda a: a.update(bev_feat_shape=(2, 2, 9, 11, 5)), r"bev_feat_shape: B \(dim 0\)"),
        (lambda a: a.update(ranks_bev=a["ranks_bev"].to("meta")), r"ranks_bev is on meta"),
        (lambda a: a.update(variant="fp8"), r"variant must be one of"),
        (lambda a: a.update(feat=a["feat"].to(torch.int8), depth=a["depth"].to(torch.int8), feat_scale=0.1),
         r"needs depth_scale"),
    ],
)
def test_input_checks(change, match):
    args = _args()
    change(args)
    with pytest.raises(ValueError, match=match):
        bev_pool_v2(**args)


def test_prepare_input_checks():
    with pytest.raises(ValueError, match=r"coor must have shape \[B, N, D, fH, fW, 3\]"):
        bev_pool_v2_prepare(torch.zeros(1, 2, 3, 4, 3))
    with pytest.raises(ValueError, match=r"interval_order must be"):
        bev_pool_v2_prepare(torch.zeros(1, 1, 1, 1, 1, 3), interval_order="random")


def _op_args(a, variant="fp32"):
    return (a["depth"], a["feat"], a["ranks_depth"], a["ranks_feat"], a["ranks_bev"], a["interval_starts"],
            a["interval_lengths"], list(a["bev_feat_shape"]), variant, 1.0, 1.0)


def test_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU reference path
    a = _args()
    a["depth"].requires_grad_(True)
    a["feat"].requires_grad_(True)
    torch.library.opcheck(torch.ops.bevdeploy.bev_pool_v2.default, _op_args(a))


def test_gradcheck_reference():
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem("cpu", N=1, D=3, fW=4, C=3, hot=0.3)
    d = depth.double().requires_grad_(True)
    f = feat.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d, f: reference(d, f, rd, rf, rb, starts, lengths, shape), (d, f))


def test_op_gradient_matches_float64_reference():
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem("cpu", hot=0.2)
    g = torch.randn(shape[0], shape[4], *shape[1:4], dtype=torch.float64)
    d64, f64 = depth.double().requires_grad_(True), feat.double().requires_grad_(True)
    want = torch.autograd.grad(reference(d64, f64, rd, rf, rb, starts, lengths, shape), (d64, f64), g)
    d32, f32 = depth.clone().requires_grad_(True), feat.clone().requires_grad_(True)
    got = torch.autograd.grad(bev_pool_v2(d32, f32, rd, rf, rb, shape, starts, lengths), (d32, f32), g.float())
    for x, y in zip(got, want):
        assert_rel_close(x, y, 1e-5)


def test_export_round_trip(device):
    depth, feat, (rb, rd, rf, starts, lengths), shape = _problem(device)

    class Pool(torch.nn.Module):
        def forward(self, depth, feat, rd, rf, rb, starts, lengths):
            return bev_pool_v2(depth, feat, rd, rf, rb, shape, starts, lengths, variant="fp16") * 2

    inputs = (depth.half(), feat.half(), rd, rf, rb, starts, lengths)
    eager = Pool()(*inputs)
    ep = torch.export.export(Pool(), inputs)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "bevdeploy.bev_pool_v2" in str(n.target)]
    assert len(nodes) == 1
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert torch.equal(loaded.module()(*inputs), eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
def test_bevdet_r50_shape_on_gpu(variant):
    coor = bevdet_like_geometry()
    ranks = [r.cuda() for r in bev_pool_v2_prepare(coor)]
    rb, rd, rf, starts, lengths = ranks
    g = torch.Generator(device="cuda").manual_seed(0)
    depth = torch.randn(1, 6, 59, 16, 44, device="cuda", generator=g).softmax(2)
    feat = torch.randn(1, 6, 16, 44, 64, device="cuda", generator=g)
    shape = (1, 1, 128, 128, 64)
    if variant == "int8":
        d_scale, f_scale = depth.max().item() / 127, feat.abs().max().item() / 127
        ds, fs = quantize_int8(depth, d_scale), quantize_int8(feat, f_scale)
        out = bev_pool_v2(ds, fs, rd, rf, rb, shape, starts, lengths, depth_scale=d_scale, feat_scale=f_scale)
        ref = scatter_add_reference(ds.double() * d_scale, fs.double() * f_scale, rd, rf, rb, shape)
        assert_int8_close(out, ref, ref.abs().max().item() * 2.0**-11 + 1e-5)
    else:
        ds, fs = depth.to(STORAGE[variant]), feat.to(STORAGE[variant])
        out = bev_pool_v2(ds, fs, rd, rf, rb, shape, starts, lengths, variant=variant)
        assert_rel_close(out, scatter_add_reference(ds.double(), fs.double(), rd, rf, rb, shape), REL_TOL[variant])
