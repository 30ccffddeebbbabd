"""``bevdeploy::image_nhwc`` (the engine's NCHW image as NHWC, channels padded to 4) against ``F.pad`` + a
channels-last copy: the Triton kernel through the interpreter on the CPU, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bevdeploy.engine.image_layout import image_nhwc, pad_in_channels, space_to_depth

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _want(x, channels):
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1])).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["contiguous", "channels_last", "sliced"])
def test_equals_pad_and_channels_last_copy(dtype, form):
    g = torch.Generator().manual_seed(len(form))
    x = torch.randn(3, 3, 13, 37, generator=g).to(DEV, dtype)  # odd sizes; pixels not a multiple of the block
    if form == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif form == "sliced":
        x = torch.randn(3, 5, 13, 40, generator=g).to(DEV, dtype)[:, 1:4, :, 2:39]
    x[0, 1, 2, 3] = float("inf")  # copied through as it is, not turned into anything else
    y = image_nhwc(x, 4)
    want = _want(x, 4)
    assert y.shape == (3, 4, 13, 37) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, want)  # a copy: bit for bit, the padded channel exactly zero
    assert torch.equal(y[:, 3], torch.zeros_like(y[:, 3]))


def test_odd_channel_counts_and_refusals():
    x = torch.randn(2, 5, 7, 9, device=DEV)
    assert torch.equal(image_nhwc(x, 8), _want(x, 8))
    assert torch.equal(image_nhwc(x[:, :4], 4), _want(x[:, :4], 4))  # nothing to pad
    with pytest.raises(ValueError, match=r"power of two >= 5 \(the image's 5 channels x block 1 squared\)"):
        image_nhwc(x, 4)
    with pytest.raises(ValueError, match="power of two"):
        image_nhwc(x, 6)
    with pytest.raises(ValueError, match="dtype"):
        image_nhwc(x.to(torch.int32), 8)
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\]"):
        image_nhwc(x[0], 8)
    assert image_nhwc(torch.randn(0, 3, 4, 4, device=DEV), 4).shape == (0, 4, 4, 4)


def test_fake_agrees_with_the_op():
    torch.library.opcheck(torch.ops.bevdeploy.image_nhwc.default, (torch.randn(2, 3, 5, 6), 4))


def test_padded_weight_gives_the_same_conv():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 19, 23, generator=g), torch.randn(8, 3, 7, 7, generator=g)
    w4 = pad_in_channels(w, 4)
    assert w4.shape == (8, 4, 7, 7) and w4.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w4[:, :3], w) and not w4[:, 3].any()
    torch.testing.assert_close(F.conv2d(_want(x, 4), w4, stride=2, padding=3), F.conv2d(x, w, stride=2, padding=3))
    with pytest.raises(ValueError, match="already has 8 > 4"):
        pad_in_channels(torch.randn(2, 8, 1, 1), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_space_to_depth_block_2_is_yoloxs_focus_order(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 10, 14, generator=g).to(DEV, dtype)[:, :, :, :]
    focus = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1)
    assert torch.equal(space_to_depth(x, 2), focus)
    y = image_nhwc(x, 16, 2)
    assert y.shape == (2, 16, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.pad(focus, (0, 0, 0, 0, 0, 4)))
    assert torch.equal(image_nhwc(x[..., 1:9, 2:14], 16, 2), _want(space_to_depth(x[..., 1:9, 2:14], 2), 16))
    with pytest.raises(ValueError, match="block must be a positive int dividing the image's 9x14"):
        image_nhwc(x[..., :9, :], 16, 2)
    with pytest.raises(ValueError, match=r">= 12 \(the image's 3 channels x block 2 squared\)"):
        image_nhwc(x, 8, 2)
    torch.library.opcheck(torch.ops.bevdeploy.image_nhwc.default, (x.cpu().float(), 16, 2))


def test_focus_stem_swap_computes_the_folded_yolox():
    """YOLOX (reduced) with BatchNorm folded: the Focus stem swapped for its NHWC form gives the same outputs,
    and its exported graph reads the image through one image_nhwc."""
    import copy

    from bevdeploy.engine.conv_epilogue import FocusNHWC, fuse_conv_epilogues
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS

    torch.manual_seed(0)
    model = MODELS["yolox-x"](deepen_factor=0.33, widen_factor=0.125, image_size=(64, 64)).eval()
    fold_batchnorms(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        fused = copy.deepcopy(model)
        names = fuse_conv_epilogues(fused)
        assert names == ["backbone.stem"] and isinstance(fused.backbone.stem, FocusNHWC)
        assert fused.backbone.stem.conv.conv.weight.shape[1] == 16
        got = fused(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    ep = torch.export.export(fused, (x,), strict=False)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.bevdeploy.image_nhwc.default) == 1
    with pytest.raises(ValueError, match="the Focus stem reads 3-channel images"):
        fused(torch.randn(2, 4, 64, 64))
