"""Asymmetric int8 (zero points): the kernels against float64 references built from the dequantized
codes, ``x = s * (q - z)``, and the modules / chain / engine that use them.

What must hold: the input zero point is exact (its ``z * w_sum`` correction is int32 and the conv pads
with ``z``, the code of 0: a padded tap is a real zero); the int8 output adds its zero point after
rounding and saturates at -128 and 127; an int8 residual is read as ``(r - z_r) * s_r``; ``z = 0``
gives the symmetric numbers unchanged.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevdeploy.quant.int8_kernels import (
    _int8_conv2d_triton,
    _int8_linear_triton,
    _quantize_per_tensor_triton,
    code_range,
    int8_conv2d,
    quantize_per_tensor,
    reference_quantize_per_tensor,
    weight_sums,
)
from bevdeploy.quant.modules import QuantConv2d, quantize_modules
from tests._utils import REL_TOL, assert_rel_close, poisoned, randomize_batchnorms

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

#: |y / out_scale - (k + 0.5)| below this may round either way (fp32 epilogue vs float64 reference).
TIE_EPS = 1e-3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _codes(*shape, g, lo=-128):
    return torch.randint(lo, 128, shape, dtype=torch.int8, generator=g)


def _ref_conv64(x_q, xs, xz, w_q, ws, bias, stride, padding, residual=None, rs=None, rz=0, activation="none"):
    """float64 conv of the dequantized codes with zero padding (a real 0 in the padding)."""
    w = (w_q.double() * ws.double()[:, None, None, None]).permute(0, 3, 1, 2)
    y = F.conv2d((x_q.double() - xz) * xs, w, None if bias is None else bias.double(), stride, padding)
    if residual is not None:
        y = y + ((residual.double() - rz) * rs if residual.dtype == torch.int8 else residual.double())
    return torch.relu(y) if activation == "relu" else y


def _check_codes(out, ref64, out_scale, out_zp):
    """int8 ``out`` vs the float64 value: exact away from .5 ties, 1 LSB at them, inside the code range."""
    assert out.dtype == torch.int8
    lo, hi = code_range(out_zp)
    q = out.cpu().double()
    v = ref64.cpu().double() / out_scale
    want = (v.round() + out_zp).clamp(lo, hi)
    assert q.min() >= lo and q.max() <= hi
    diff = (q - want).abs()
    assert diff.max().item() <= 1, f"max code error {diff.max().item()} > 1 LSB"
    near_tie = ((v - v.floor()) - 0.5).abs() < TIE_EPS
    assert (diff[~near_tie] == 0).all(), f"{int((diff[~near_tie] > 0).sum())} codes off away from a .5 tie"


def _int8_poison(ref_codes: torch.Tensor) -> torch.Tensor:
    """An int8 buffer that differs from the expected codes everywhere (-128 is a valid asymmetric code)."""
    return (((ref_codes.to(torch.int32) + 128 + 100) % 256) - 128).to(torch.int8)


# ---------------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("zp", [0, -128, -61, 9])
def test_quantize_with_zero_point_equals_torch_and_codes_zero_exactly(device, zp):
    g = _gen(1)
    x = (torch.randn(3, 5, 7, 11, generator=g) * 3).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = 0.0
    x[0, 0, 0, 1], x[0, 0, 0, 2] = 1e6, -1e6  # saturation both ways
    want = reference_quantize_per_tensor(x, 0.02, zp)
    out = _quantize_per_tensor_triton(x.to(device), 0.02, out=poisoned(x.shape, torch.int8, device).contiguous(
        memory_format=torch.channels_last), zero_point=zp)
    assert torch.equal(out.cpu(), want)
    lo, hi = code_range(zp)
    assert want[0, 0, 0, 0] == zp and want[0, 0, 0, 1] == hi and want[0, 0, 0, 2] == lo
    assert lo == (-127 if zp == 0 else -128)
    assert torch.equal(quantize_per_tensor(x, 0.02, zp), want)  # the public op (CPU reference path)


def test_zero_zero_point_is_the_symmetric_quantizer():
    x = torch.randn(4, 50, generator=_gen(2)) * 5
    sym = torch.clamp(torch.round(x / 0.03), -127, 127).to(torch.int8)
    assert torch.equal(reference_quantize_per_tensor(x, 0.03, 0), sym)
    assert torch.equal(reference_quantize_per_tensor(x, 0.03), sym)


# ---------------------------------------------------------------------------------------------- conv / linear


# (C, O, kernel, stride, padding, x zero point, EVEN_C by BLOCK_K=32?)
ZP_CONVS = [
    (3, 17, 3, 1, 1, -128),  # odd channels, a ReLU input's zero point, padded taps
    (40, 9, 3, 2, 1, -57),  # channel tail (40 = 32 + 8), stride 2
    (64, 33, 3, 1, 2, 17),  # dilation-free padding 2 (a 3x3 with two padded rings)
    (19, 12, 1, 1, 0, -100),  # 1x1: the GEMM path
]


@pytest.mark.parametrize("case", range(len(ZP_CONVS)))
def test_conv_input_zero_point_matches_float64(device, case):
    c, o, k, s, p, xz = ZP_CONVS[case]
    g = _gen(10 + case)
    x_q = _codes(2, c, 9, 7, g=g).contiguous(memory_format=torch.channels_last)
    w_q = _codes(o, k, k, c, g=g, lo=-127)
    ws, b = torch.rand(o, generator=g) * 0.01 + 0.001, torch.randn(o, generator=g)
    ho = (9 + 2 * p - k) // s + 1
    wo = (7 + 2 * p - k) // s + 1
    out = poisoned((2, o, ho, wo), torch.float32, device).contiguous(memory_format=torch.channels_last)
    _int8_conv2d_triton(x_q.to(device), w_q.to(device), 0.02, ws.to(device), b.to(device), [s, s], [p, p], [1, 1], 1,
                        None, "relu", "float32", out=out, x_zero_point=xz)
    assert_rel_close(out, _ref_conv64(x_q, 0.02, xz, w_q, ws, b, s, p, activation="relu"), REL_TOL["fp32"])
    # the public op with a precomputed w_sum (what a layer passes) gives the same numbers
    pub = int8_conv2d(x_q.to(device), w_q.to(device), 0.02, ws.to(device), b.to(device), s, p, activation="relu",
                      out_dtype=torch.float32, x_zero_point=xz, w_sum=weight_sums(w_q).to(device))
    assert_rel_close(pub, _ref_conv64(x_q, 0.02, xz, w_q, ws, b, s, p, activation="relu"), REL_TOL["fp32"])


@pytest.mark.parametrize("dilation,padding", [(2, 2), (2, 1), (3, 3)])
def test_conv_zero_point_with_dilation_and_padding_wider_than_the_image(device, dilation, padding):
    """Kernel points of a dilated conv fall outside a 4x5 image on every side, several at once: each holds the
    zero point's code."""
    g = _gen(30 + dilation + padding)
    x_q = _codes(2, 5, 4, 5, g=g).contiguous(memory_format=torch.channels_last)
    w_q, ws = _codes(7, 3, 3, 5, g=g, lo=-127), torch.rand(7, generator=g) * 0.01 + 0.001
    x64 = (x_q.double() + 90) * 0.02
    want = F.conv2d(x64, (w_q.double() * ws.double()[:, None, None, None]).permute(0, 3, 1, 2), None, 1, padding,
                    dilation)
    out = int8_conv2d(x_q.to(device), w_q.to(device), 0.02, ws.to(device), None, 1, padding, dilation,
                      out_dtype=torch.float32, x_zero_point=-90, w_sum=weight_sums(w_q).to(device))
    assert_rel_close(out, want, REL_TOL["fp32"])


@pytest.mark.parametrize("rz,out_zp", [(0, -128), (-40, 23), (77, 0)])
def test_conv_requantizes_with_zero_points_and_reads_an_int8_residual_with_its_own(device, rz, out_zp):
    g = _gen(20)
    x_q = _codes(2, 21, 6, 5, g=g).contiguous(memory_format=torch.channels_last)
    w_q, ws = _codes(13, 3, 3, 21, g=g, lo=-127), torch.rand(13, generator=g) * 0.01 + 0.001
    b = torch.randn(13, generator=g)
    r = _codes(2, 13, 6, 5, g=g).contiguous(memory_format=torch.channels_last)
    ref = _ref_conv64(x_q, 0.02, -30, w_q, ws, b, 1, 1, r, 0.05, rz, "relu")
    out_scale = float(ref.abs().quantile(0.9)) / 127  # saturates the top 10%
    want = torch.clamp(torch.round(ref / out_scale) + out_zp, *code_range(out_zp)).to(torch.int8)
    out = _int8_poison(want).to(device)
    _int8_conv2d_triton(x_q.to(device), w_q.to(device), 0.02, ws.to(device), b.to(device), [1, 1], [1, 1], [1, 1],
                        1, r.to(device), "relu", "float16", out=out, residual_scale=0.05, out_scale=out_scale,
                        x_zero_point=-30, residual_zero_point=rz, out_zero_point=out_zp)
    _check_codes(out, ref, out_scale, out_zp)
    assert (out.cpu() == code_range(out_zp)[1]).any(), "nothing saturated at 127: the test lost its point"


def test_linear_zero_points_match_float64(device):
    g = _gen(30)
    x_q, w_q = _codes(37, 45, g=g), _codes(11, 45, g=g, lo=-127)
    ws = torch.rand(11, generator=g) * 0.01 + 0.001
    ref = ((x_q.double() - 12) * 0.03) @ (w_q.double() * ws.double()[:, None]).t()
    out = _int8_linear_triton(x_q.to(device), w_q.to(device), 0.03, ws.to(device), None, None, "none", "float32",
                              x_zero_point=12)
    assert_rel_close(out, ref, REL_TOL["fp32"])
    out_scale = float(ref.abs().max()) / 100
    codes = _int8_linear_triton(x_q.to(device), w_q.to(device), 0.03, ws.to(device), None, None, "none", "float32",
                                x_zero_point=12, out_scale=out_scale, out_zero_point=-128)
    _check_codes(codes, ref, out_scale, -128)


def test_zero_point_arguments_are_checked():
    x_q, w_q, ws = torch.zeros(1, 4, 3, 3, dtype=torch.int8), torch.zeros(2, 3, 3, 4, dtype=torch.int8), torch.ones(2)
    with pytest.raises(ValueError, match="x_zero_point"):
        int8_conv2d(x_q, w_q, 0.1, ws, x_zero_point=128)
    with pytest.raises(ValueError, match="out_zero_point applies to an int8 output"):
        int8_conv2d(x_q, w_q, 0.1, ws, out_zero_point=3)
    with pytest.raises(ValueError, match="residual_zero_point applies to an int8 residual"):
        int8_conv2d(x_q, w_q, 0.1, ws, residual=torch.zeros(1, 2, 1, 1), residual_zero_point=3)
    with pytest.raises(ValueError, match="w_sum"):
        int8_conv2d(x_q, w_q, 0.1, ws, x_zero_point=3, w_sum=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="zero_point"):
        quantize_per_tensor(torch.zeros(3), 0.1, -129)


# ---------------------------------------------------------------------------------------------- layers


def test_quant_conv_with_zero_point_equals_the_float_conv_of_its_dequantized_input():
    """A ReLU input: asymmetric codes use all 256 steps on [0, max], symmetric only 128."""
    g = _gen(40)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    x = torch.relu(torch.randn(2, 8, 7, 7, generator=g))
    amax = float(x.max())
    errors = {}
    for zp, scale in ((0, amax / 127), (-128, amax / 255)):
        q = QuantConv2d.from_float(conv, scale, out_dtype=torch.float32)
        if zp:
            q.set_input_zero_point(zp)
            assert torch.equal(q.w_sum, weight_sums(q.weight))
        xd = (reference_quantize_per_tensor(x, scale, zp).double() - zp) * scale  # what the layer sees
        w = q.weight.double().permute(0, 3, 1, 2) * q.weight_scale.double()[:, None, None, None]
        want = F.conv2d(xd, w, q.bias.double(), padding=1)
        assert_rel_close(q(x), want, REL_TOL["fp32"])
        errors[zp] = (q(x).double() - F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)).norm()
    assert errors[-128] < 0.75 * errors[0], errors  # half the input step: a clearly smaller error


def test_quantize_modules_sets_zero_points_and_reports_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    report = quantize_modules(model, {"0": 0.02, "2": 0.01}, zero_points={"2": -128}, out_dtype=torch.float32)
    assert model[0].input_zero_point == 0 and model[2].input_zero_point == -128
    assert any(r.name == "2" and "zero point -128" in r.reason for r in report)
    with pytest.raises(ValueError, match="zero point"):
        model[0].set_input_zero_point(300)
    # the zero point travels with the state dict: a fresh symmetric layer loading it becomes asymmetric
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    quantize_modules(fresh, {"0": 0.5, "2": 0.5}, out_dtype=torch.float32)
    assert "2.input_zero_point_tensor" in model.state_dict() and "0.input_zero_point_tensor" not in model.state_dict()
    fresh.load_state_dict(model.state_dict())
    assert fresh[2].input_zero_point == -128 and torch.equal(fresh[2].w_sum, model[2].w_sum)
    x = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(fresh(x), model(x))
    symmetric = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    quantize_modules(symmetric, {"0": 0.5, "2": 0.5}, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="input_zero_point_tensor"):  # asymmetric layer, symmetric state
        model.load_state_dict(symmetric.state_dict())


# ---------------------------------------------------------------------------------------------- chain


def _folded(name, **overrides):
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS

    torch.manual_seed(0)
    model = MODELS[name](**overrides).eval()
    randomize_batchnorms(model)  # non-trivial folded biases
    fold_batchnorms(model)
    return model


@pytest.mark.parametrize("name,overrides,part,probe,gain_db", [
    # ReLU blocks with int8 identities: every int8 input is one-sided, asymmetric codes halve the step
    ("centernet-r18-dcn", dict(image_size=(64, 64)), "backbone", "backbone.layer4.1.conv2", 3.0),
    # SiLU, CSP concats, SPP: the plumbing (shared zero points of concatenated writers); on this random
    # reduced model the outputs barely see the int8 error either way (48.2 vs 49.1 dB box SQNR)
    ("yolox-x", dict(deepen_factor=0.33, widen_factor=0.125, image_size=(64, 64)), "", "backbone.stage4.0.conv", 0.0),
])
def test_chain_carries_zero_points(ops_on_references, name, overrides, part, probe, gain_db):
    """Readers of one tensor share one (scale, zero point), producers write codes with it, residual
    epilogues read the identity with it: the chained asymmetric model equals the unchained one up to
    the chain's own roundings, and beats the symmetric chain where inputs are one-sided."""
    import copy

    from bevdeploy.engine.model_io import image_input_convs
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import chain_int8
    from bevdeploy.quant.modules import _QuantBase
    from bevdeploy.quant.sensitivity import sqnr_db

    model = _folded(name, **overrides)
    # else the heads' priors (CenterNet's -2.19, YOLOX's -4.6) dominate the outputs and hide the int8 error
    for m in model.bbox_head.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None and m.out_channels < 32:
            m.bias.data.zero_()
    x = torch.rand(2, 3, 64, 64, generator=_gen(1)) * 4 - 2
    table = calibrate(model, lambda m: m(x), "minmax")
    names = [n for n in table.amax if n.startswith(part) and isinstance(model.get_submodule(n), nn.Conv2d)]
    keep = set(image_input_convs(model))
    outs = {}
    for asym in (False, True):
        for chain in (False, True):
            m = copy.deepcopy(model)
            qp = {n: table.qparams(n, asymmetric=asym) for n in names}
            quantize_modules(m, {n: s for n, (s, _) in qp.items()},
                             zero_points={n: z for n, (_, z) in qp.items() if z}, keep_float=keep,
                             out_dtype=torch.float32)
            if chain:
                assert len(chain_int8(m)) > 5
            layers = {n: q for n, q in m.named_modules() if isinstance(q, _QuantBase)}
            if asym:
                assert sum(q.input_zero_point != 0 for q in layers.values()) > len(layers) // 2
                if chain:
                    writers = [q for q in layers.values() if q.out_scale is not None]
                    assert any(q.out_zero_point != 0 for q in writers)
            else:
                assert all(q.input_zero_point == 0 and q.out_zero_point == 0 for q in layers.values())
            # an int8 layer's input after residual blocks, dequantized: the heads' outputs alone barely see
            # a wrong zero point on the random YOLOX (a block identity read with z = 0 passes there)
            seen = {}
            m.get_submodule(probe).register_forward_pre_hook(lambda mod, args, seen=seen: seen.setdefault("x", (
                (args[0].float() - mod.input_zero_point) * mod.input_scale if args[0].dtype == torch.int8
                else args[0].float())))
            with torch.no_grad():
                outs[asym, chain] = {**m(x), "probe": seen["x"]}
    with torch.no_grad():
        ref = model(x)

    def worst(a, b):
        return min(sqnr_db(a[k].float(), b[k].float()) for k in a if k in b)

    assert worst(outs[True, False], outs[True, True]) > 30.0  # a wrong zero point anywhere would wreck this
    assert worst(ref, outs[True, True]) > worst(ref, outs[False, True]) + gain_db
