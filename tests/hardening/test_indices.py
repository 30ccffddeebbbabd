"""bev_pool_v2 indices: host checks, the reference path never wraps, the kernel's guard flag."""

import pytest
import torch

from bevdeploy.ops import bev_pool_v2 as bp
from bevdeploy.ops.bev_pool_v2 import bev_pool_v2, bev_pool_v2_prepare, bevdet_like_geometry, check_ranks, reference

SHAPE = (1, 1, 128, 128, 16)


@pytest.fixture(scope="module")
def case():
    coor = bevdet_like_geometry(num_cams=2, depth_bins=8, feat_h=4, feat_w=8)
    rb, rd, rf, st, ln = bev_pool_v2_prepare(coor)
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(1, 2, 8, 4, 8, generator=g).softmax(2)
    feat = torch.randn(1, 2, 4, 8, 16, generator=g)
    return depth, feat, dict(ranks_depth=rd, ranks_feat=rf, ranks_bev=rb, interval_starts=st, interval_lengths=ln)


def _bad(ranks, name, pos, value):
    out = {k: v.clone() for k, v in ranks.items()}
    out[name][pos] = value
    return out


def _call(fn, depth, feat, r):
    if fn is reference:
        return reference(depth, feat, r["ranks_depth"], r["ranks_feat"], r["ranks_bev"], r["interval_starts"],
                         r["interval_lengths"], SHAPE)
    return bev_pool_v2(depth, feat, r["ranks_depth"], r["ranks_feat"], r["ranks_bev"], SHAPE,
                       r["interval_starts"], r["interval_lengths"])


@pytest.mark.parametrize("name,value,match", [
    ("ranks_depth", -1, r"ranks_depth\[\d+\] = -1 is out of range: must be in \[0, 511\]"),
    ("ranks_depth", 512, r"ranks_depth\[\d+\] = 512"),
    ("ranks_feat", -3, r"ranks_feat\[\d+\] = -3 .* \[0, 63\]"),
    ("ranks_bev", 128 * 128, r"ranks_bev\[\d+\] = 16384 .* \[0, 16383\]"),
    ("interval_starts", -2, r"interval_starts\[\d+\] = -2"),
    ("interval_lengths", -1, r"interval_lengths\[\d+\] = -1"),
])
def test_reference_raises_instead_of_wrapping(case, name, value, match):
    depth, feat, ranks = case
    with pytest.raises(ValueError, match=match):
        _call(reference, depth, feat, _bad(ranks, name, 3, value))


def test_interval_past_the_end_is_refused(case):
    _, _, r = case
    P = r["ranks_depth"].shape[0]
    bad = _bad(r, "interval_starts", 0, P - 1)
    bad["interval_lengths"][0] = 2
    with pytest.raises(ValueError, match=rf"interval 0 \(start {P - 1}, length 2\) runs past the {P} points"):
        check_ranks(*bad.values(), num_depth=512, num_pixels=64, num_voxels=128 * 128)


@pytest.mark.parametrize("name", ["ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"])
def test_kernel_guard_masks_bad_indices_and_reports(case, name, monkeypatch):
    """Through Triton's interpreter: the bad point / interval is skipped (nothing else changes),
    the flag is raised, read by the eager wrapper, and cleared."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    depth, feat, r = case
    k = 0  # the longest interval
    s, n = int(r["interval_starts"][k]), int(r["interval_lengths"][k])
    pos = {"ranks_depth": s + 1, "ranks_feat": s + 1, "ranks_bev": s}.get(name, k)
    value = {"ranks_depth": -7, "ranks_feat": 10**6, "ranks_bev": -1, "interval_starts": -5,
             "interval_lengths": 10**6}[name]
    bad = _bad(r, name, pos, value)
    with pytest.raises(ValueError, match="out-of-range indices .* were passed to the kernel"):
        _call(bev_pool_v2, depth, feat, bad)
    assert int(bp._error_flag(feat.device).item()) == 0  # cleared once reported
    # what the kernel computed: the reference without the skipped point / interval
    out = bp._bev_pool_v2_triton(depth, feat, bad["ranks_depth"], bad["ranks_feat"], bad["ranks_bev"],
                                 bad["interval_starts"], bad["interval_lengths"], SHAPE, "fp32")
    bp._error_flag(feat.device).zero_()
    keep = {k2: v.clone() for k2, v in r.items()}
    if name in ("ranks_depth", "ranks_feat"):  # the point is dropped: move it out of its interval
        keep["ranks_depth"][pos] = 0
        keep["ranks_feat"][pos] = 0
        expected = _call(reference, depth, feat, keep) - _point(depth, feat, r, pos, s)
    else:  # the whole interval is dropped
        keep["interval_lengths"][k] = 0
        expected = _call(reference, depth, feat, keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def _point(depth, feat, r, pos, start):
    """The contribution of point ``pos`` after zeroing its ranks (depth[0] * feat[0]) in its voxel."""
    out = torch.zeros(SHAPE[0], SHAPE[4], *SHAPE[1:4])
    cell = int(r["ranks_bev"][start])
    z, rest = divmod(cell, SHAPE[2] * SHAPE[3])
    y, x = divmod(rest, SHAPE[3])
    out[0, :, z, y, x] = depth.reshape(-1)[0] * feat.reshape(-1, 16)[0]
    return out


def test_valid_indices_pass_and_match(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    depth, feat, r = case
    torch.testing.assert_close(_call(bev_pool_v2, depth, feat, r), _call(reference, depth, feat, r), atol=1e-5, rtol=1e-5)


BEVDET_SMALL = dict(image_size=(32, 96), depth_bins=(1.0, 17.0, 2.0), grid_x=(-12.8, 12.8, 1.6),
                    grid_y=(-12.8, 12.8, 1.6), fpn_out_channels=32, bev_channels=16, bev_layer_channels=(16, 32, 64),
                    bev_neck_out_channels=32, share_conv_channels=16, head_conv_channels=16)


def test_bevdet_engine_refuses_out_of_range_index_inputs(tmp_path, monkeypatch):
    """The index arrays are engine inputs: a bad one is an error naming it, never a stray read."""
    from bevdeploy.engine import Engine, build

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU engine runs the op's reference path
    path = build("bevdet-r50-cbgs", "fp32", out=tmp_path / "bevdet.engine", model_overrides=BEVDET_SMALL,
                 progress=False)
    engine = Engine.load(path, device="cpu")
    inputs = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in engine.input_spec.items()}
    engine(**inputs)  # all-zero indices: a valid empty pooling
    P = inputs["ranks_depth"].shape[0]
    for name, value, match in (("ranks_feat", -1, r"ranks_feat\[0\] = -1"),
                               ("interval_lengths", P + 1, r"interval_lengths\[0\] = \d+ is out of range")):
        bad = dict(inputs)
        bad[name] = inputs[name].clone()
        bad[name][0] = value
        with pytest.raises(ValueError, match=match):
            engine(**bad)
