"""int8 in, int8 out: the requantizing epilogue (bias + residual + activation + requant) against a
float64 reference from the same codes, and the int8 chain through ResNet blocks (``chain_int8``).

Epilogue bound: the kernel sums exactly in int32 and runs the epilogue in fp32, so its pre-rounding
value differs from the float64 one by a few fp32 ulps; a code may then differ by one step only where
the float64 quotient y / out_scale lies within TIE_EPS of a .5 tie. Everywhere else it must be exact.
"""

import pytest
import torch
import torch.nn.functional as F

from bevdeploy.quant.int8_kernels import (
    _int8_conv2d_triton,
    _int8_linear_triton,
    int8_conv2d,
    int8_linear,
    reference_int8_conv2d,
    reference_int8_linear,
)
from tests._utils import poisoned

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

#: |y / out_scale - (k + 0.5)| below this may round either way (fp32 epilogue vs float64 reference).
TIE_EPS = 1e-3


def _codes(*shape, device, g=None):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device="cpu", generator=g).to(device)


def _check_requant(out: torch.Tensor, ref64: torch.Tensor, out_scale: float) -> None:
    """``out`` int8 codes vs float64 ``ref64``: within 1 LSB everywhere, exact away from ties, never -128."""
    assert out.dtype == torch.int8
    q = out.cpu().double()
    v = ref64.cpu().double() / out_scale
    want = v.round().clamp(-127, 127)  # round-half-even, as the kernel
    assert (q >= -127).all(), "code -128 written (symmetric int8 stops at -127)"
    diff = (q - want).abs()
    assert diff.max().item() <= 1, f"max code error {diff.max().item()} > 1 LSB"
    near_tie = ((v - v.floor()) - 0.5).abs() < TIE_EPS
    assert (diff[~near_tie] == 0).all(), f"{int((diff[~near_tie] > 0).sum())} codes off away from a .5 tie"


def _ref_conv64(x_q, xs, w_q, ws, bias, stride, padding, residual, rs, activation):
    w = (w_q.double() * ws.double()[:, None, None, None]).permute(0, 3, 1, 2)
    y = F.conv2d(x_q.double() * xs, w, None if bias is None else bias.double(), stride, padding)
    if residual is not None:
        y = y + residual.double() * (rs if residual.dtype == torch.int8 else 1.0)
    return torch.relu(y) if activation == "relu" else y


# (C, O, kernel, stride, padding, residual kind, activation)
REQUANT_CONVS = [
    (3, 17, 3, 1, 1, "int8", "relu"),  # odd channels, int8 identity residual, ReLU (a bottleneck conv3 with 3x3)
    (17, 33, 1, 1, 0, "float", "relu"),  # 1x1 stride 1: the GEMM path, float residual (downsample branch)
    (33, 3, 3, 2, 1, None, "none"),  # stride 2, no residual, no activation: negative codes saturate too
]


@pytest.mark.parametrize("case", range(len(REQUANT_CONVS)))
def test_conv_requant_epilogue(device, case):
    c, o, k, s, p, res, act = REQUANT_CONVS[case]
    g = torch.Generator().manual_seed(case)
    n, h, w = 2, 7, 9
    x_q = _codes(n, c, h, w, device=device, g=g).contiguous(memory_format=torch.channels_last)
    w_q = _codes(o, k, k, c, device=device, g=g)
    ws = (torch.rand(o, generator=g) * 0.02 + 0.002).to(device)
    bias = torch.randn(o, generator=g).to(device)
    xs = 0.013
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    rs = 0.05
    residual = None
    if res == "int8":
        residual = _codes(n, o, ho, wo, device=device, g=g).contiguous(memory_format=torch.channels_last)
    elif res == "float":
        residual = torch.randn(n, o, ho, wo, generator=g).half().to(device)
    ref = _ref_conv64(x_q, xs, w_q, ws, bias, s, p, residual, rs, act)
    # the scale puts ~10% of the outputs beyond +-127 (saturation) and the rest on many codes
    out_scale = float(ref.abs().quantile(0.9)) / 127
    out = poisoned((n, o, ho, wo), torch.int8, device).contiguous(memory_format=torch.channels_last)
    _int8_conv2d_triton(x_q, w_q, xs, ws, bias, [s, s], [p, p], [1, 1], 1, residual, act, "float16", out=out,
                        residual_scale=rs if res == "int8" else None, out_scale=out_scale)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check_requant(out, ref, out_scale)
    assert (out == 127).any() and (act == "relu" or (out == -127).any()), "saturation not exercised"
    # the plain-torch reference (CPU path) obeys the same bound
    cpu = reference_int8_conv2d(x_q.cpu(), w_q.cpu(), xs, ws.cpu(), bias.cpu(), (s, s), (p, p), (1, 1), 1,
                                None if residual is None else residual.cpu(), act, "float16",
                                rs if res == "int8" else None, out_scale)
    _check_requant(cpu, ref, out_scale)


def test_linear_requant_epilogue_int8_residual(device):
    g = torch.Generator().manual_seed(7)
    m, n, k = 37, 33, 45
    x_q, w_q = _codes(m, k, device=device, g=g), _codes(n, k, device=device, g=g)
    ws = (torch.rand(n, generator=g) * 0.02 + 0.002).to(device)
    r = _codes(m, n, device=device, g=g)
    xs, rs = 0.011, 0.03
    ref = (x_q.double() * xs) @ (w_q.double() * ws.double()[:, None]).t() + r.double() * rs
    ref = torch.relu(ref)
    out_scale = float(ref.abs().quantile(0.95)) / 127
    out = _int8_linear_triton(x_q, w_q, xs, ws, None, r, "relu", "float16", out=poisoned((m, n), torch.int8, device),
                              residual_scale=rs, out_scale=out_scale, config=(16, 16, 32, 2, 4, 1))
    _check_requant(out, ref, out_scale)
    public = int8_linear(x_q, w_q, xs, ws, residual=r, residual_scale=rs, activation="relu", out_scale=out_scale)
    _check_requant(public, ref, out_scale)
    _check_requant(reference_int8_linear(x_q.cpu(), w_q.cpu(), xs, ws.cpu(), None, r.cpu(), "relu", "float16", rs,
                                         out_scale), ref, out_scale)


# (M, N, K, bias, residual kind, activation, config): odd sizes, the K tail masked, several tiles
REQUANT_LINEARS = [
    (37, 19, 45, True, None, "relu", (16, 16, 32, 2, 4, 1)),  # FFN's first linear: bias + fused ReLU
    (5, 33, 67, True, "float", "none", None),  # float residual, negative codes saturate too
    (70, 7, 32, False, None, "none", (16, 16, 32, 4, 4, 1)),  # no bias, K = one block exactly
    (1, 41, 13, True, "int8", "relu", None),  # one row, K shorter than a block
]


@pytest.mark.parametrize("case", range(len(REQUANT_LINEARS)))
def test_linear_requant_epilogue(device, case):
    """int8_linear's int8-out epilogue (bias + residual + activation + requant) against float64."""
    m, n, k, has_bias, res, act, cfg = REQUANT_LINEARS[case]
    g = torch.Generator().manual_seed(100 + case)
    x_q, w_q = _codes(m, k, device=device, g=g), _codes(n, k, device=device, g=g)
    ws = (torch.rand(n, generator=g) * 0.02 + 0.002).to(device)
    bias = torch.randn(n, generator=g).to(device) if has_bias else None
    xs, rs = 0.013, 0.04
    residual = None
    if res == "int8":
        residual = _codes(m, n, device=device, g=g)
    elif res == "float":
        residual = torch.randn(m, n, generator=g).half().to(device)
    ref = (x_q.double() * xs) @ (w_q.double() * ws.double()[:, None]).t()
    if bias is not None:
        ref = ref + bias.double()
    if residual is not None:
        ref = ref + residual.double() * (rs if res == "int8" else 1.0)
    ref = torch.relu(ref) if act == "relu" else ref
    out_scale = float(ref.abs().quantile(0.9)) / 127  # ~10% saturate
    rsc = rs if res == "int8" else None
    out = _int8_linear_triton(x_q, w_q, xs, ws, bias, residual, act, "float16",
                              out=poisoned((m, n), torch.int8, device), residual_scale=rsc, out_scale=out_scale,
                              config=cfg)
    _check_requant(out, ref, out_scale)
    assert (out == 127).any() and (act == "relu" or (out == -127).any()), "saturation not exercised"
    if act == "relu":
        assert (out >= 0).all()
    public = int8_linear(x_q[None], w_q, xs, ws, bias, residual=None if residual is None else residual[None],
                         residual_scale=rsc, activation=act, out_scale=out_scale)  # leading dims kept
    assert public.shape == (1, m, n) and public.dtype == torch.int8
    _check_requant(public[0], ref, out_scale)
    cpu = reference_int8_linear(x_q.cpu(), w_q.cpu(), xs, ws.cpu(), None if bias is None else bias.cpu(),
                                None if residual is None else residual.cpu(), act, "float16", rsc, out_scale)
    _check_requant(cpu, ref, out_scale)


# residual after the activation (YOLOX's DarknetBottleneck: x + SiLU(conv2(conv1(x)))), against float64:
# (C, O, kernel, stride, padding, residual kind, activation, out int8)
AFTER_ACT_CONVS = [
    (5, 17, 3, 1, 1, "int8", "silu", True),  # odd channels, int8 identity (the block input's codes)
    (17, 9, 1, 1, 0, "float", "silu", True),  # 1x1 stride 1: the GEMM path, fp16 identity (float-identity mode)
    (9, 7, 3, 1, 1, "int8", "relu", False),  # float output (the block's output leaves the chain)
]


def _silu64(y):
    return y * torch.sigmoid(y)


@pytest.mark.parametrize("case", range(len(AFTER_ACT_CONVS)))
def test_conv_residual_after_activation(device, case):
    """``residual_after_act``: y = act(conv + bias) + residual (fp32 epilogue), requantized with the same
    bound as the residual-first epilogue; the default (residual before the activation) is unchanged."""
    c, o, k, s, p, res, act, out_int8 = AFTER_ACT_CONVS[case]
    g = torch.Generator().manual_seed(200 + case)
    n, h, w = 2, 5, 7
    x_q = _codes(n, c, h, w, device=device, g=g).contiguous(memory_format=torch.channels_last)
    w_q = _codes(o, k, k, c, device=device, g=g)
    ws = (torch.rand(o, generator=g) * 0.02 + 0.002).to(device)
    bias = torch.randn(o, generator=g).to(device)
    xs, rs = 0.013, 0.2  # identity codes up to +-25: the output saturates on both signs
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if res == "int8":
        residual = _codes(n, o, ho, wo, device=device, g=g).contiguous(memory_format=torch.channels_last)
    else:
        residual = (torch.randn(n, o, ho, wo, generator=g) * 10).half().to(device)
    rsc = rs if res == "int8" else None
    pre = _ref_conv64(x_q, xs, w_q, ws, bias, s, p, None, None, "none")
    r64 = residual.double() * (rs if res == "int8" else 1.0)
    ref = (_silu64(pre) if act == "silu" else torch.relu(pre)) + r64
    before = _silu64(pre + r64) if act == "silu" else torch.relu(pre + r64)
    assert (ref - before).abs().max() > 1.0, "the two orders must differ on this data"
    if out_int8:
        out_scale = float(ref.abs().quantile(0.9)) / 127  # ~10% saturate, on both signs (residual < 0)
        out = poisoned((n, o, ho, wo), torch.int8, device).contiguous(memory_format=torch.channels_last)
        _int8_conv2d_triton(x_q, w_q, xs, ws, bias, [s, s], [p, p], [1, 1], 1, residual, act, "float16", out=out,
                            residual_scale=rsc, out_scale=out_scale, residual_after_act=True)
        _check_requant(out, ref, out_scale)
        assert (out == 127).any() and (out == -127).any(), "saturation not exercised"
        public = int8_conv2d(x_q, w_q, xs, ws, bias, s, p, residual=residual, residual_scale=rsc, activation=act,
                             out_scale=out_scale, residual_after_act=True)
        _check_requant(public, ref, out_scale)
        cpu = reference_int8_conv2d(x_q.cpu(), w_q.cpu(), xs, ws.cpu(), bias.cpu(), (s, s), (p, p), (1, 1), 1,
                                    residual.cpu(), act, "float16", rsc, out_scale, residual_after_act=True)
        _check_requant(cpu, ref, out_scale)
    else:
        out = int8_conv2d(x_q, w_q, xs, ws, bias, s, p, residual=residual, residual_scale=rsc, activation=act,
                          out_dtype=torch.float32, residual_after_act=True)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=1e-4, rtol=1e-5)
    default = int8_conv2d(x_q, w_q, xs, ws, bias, s, p, residual=residual, residual_scale=rsc, activation=act,
                          out_dtype=torch.float32)  # residual first, as before
    torch.testing.assert_close(default.double().cpu(), before.cpu(), atol=1e-4, rtol=1e-5)


def test_linear_residual_after_activation(device):
    """The linear kernel's epilogue is the same code: fp16 and int8 residuals, odd sizes, a masked K tail."""
    g = torch.Generator().manual_seed(9)
    m, n, k = 37, 19, 45
    x_q, w_q = _codes(m, k, device=device, g=g), _codes(n, k, device=device, g=g)
    ws = (torch.rand(n, generator=g) * 0.02 + 0.002).to(device)
    bias = torch.randn(n, generator=g).to(device)
    xs, rs = 0.011, 0.1  # residuals up to ~+-13: the output saturates on both signs
    pre = (x_q.double() * xs) @ (w_q.double() * ws.double()[:, None]).t() + bias.double()
    float_residual = (torch.randn(m, n, generator=g) * 8).half().to(device)
    for residual, rsc in ((_codes(m, n, device=device, g=g), rs), (float_residual, None)):
        ref = _silu64(pre) + residual.double() * (rsc or 1.0)
        out_scale = float(ref.abs().quantile(0.9)) / 127
        out = _int8_linear_triton(x_q, w_q, xs, ws, bias, residual, "silu", "float16",
                                  out=poisoned((m, n), torch.int8, device), residual_scale=rsc, out_scale=out_scale,
                                  config=(16, 16, 32, 2, 4, 1), residual_after_act=True)
        _check_requant(out, ref, out_scale)
        assert (out == 127).any() and (out == -127).any()
        cpu = reference_int8_linear(x_q.cpu(), w_q.cpu(), xs, ws.cpu(), bias.cpu(), residual.cpu(), "silu", "float16",
                                    rsc, out_scale, residual_after_act=True)
        _check_requant(cpu, ref, out_scale)
        f32 = int8_linear(x_q, w_q, xs, ws, bias, residual=residual, residual_scale=rsc, activation="silu",
                          out_dtype=torch.float32, residual_after_act=True)
        torch.testing.assert_close(f32.double().cpu(), ref.cpu(), atol=1e-4, rtol=1e-5)


def test_residual_after_activation_nan_never_passes(device):
    """A NaN residual (or bias) after the activation becomes code 0, never a saturated code; +-inf
    residuals saturate; the other rows are exact."""
    x_q, w_q = torch.ones(3, 40, dtype=torch.int8, device=device), torch.ones(6, 40, dtype=torch.int8, device=device)
    ws = torch.ones(6, device=device)
    bias = torch.tensor([float("nan"), 0.0, 0.0, -4.0, -4.0, -4.0], device=device)
    residual = torch.tensor([[1.0, float("inf"), -float("inf"), float("nan"), 2.0, -9.0]] * 3, device=device).half()
    # y = silu(4 + bias) + residual: nan, inf, -inf, nan, 0 + 2, 0 - 9 (SiLU keeps a NaN; ReLU's max may drop it)
    want = [0, 127, -127, 0, 20, -90]
    out = _int8_linear_triton(x_q, w_q, 0.1, ws, bias, residual, "silu", "float16",
                              out=poisoned((3, 6), torch.int8, device), out_scale=0.1, residual_after_act=True)
    ref = reference_int8_linear(x_q.cpu(), w_q.cpu(), 0.1, ws.cpu(), bias.cpu(), residual.cpu(), "silu", "float16",
                                None, 0.1, residual_after_act=True)
    assert out.cpu().tolist() == [want] * 3 and ref.tolist() == [want] * 3


def test_opcheck_residual_after_activation():
    torch.library.opcheck(torch.ops.bevdeploy.int8_conv2d.default,
                          (_codes(1, 4, 5, 5, device="cpu").contiguous(memory_format=torch.channels_last),
                           _codes(3, 3, 3, 4, device="cpu"), 0.1, torch.rand(3) + 0.1, torch.randn(3), [1, 1], [1, 1],
                           [1, 1], 1, _codes(1, 3, 5, 5, device="cpu"), "silu", "float16", 0.05, 0.2, None, True))


@pytest.mark.parametrize("act", ["none", "relu"])
def test_requant_nan_becomes_code_zero(device, act):
    """A NaN in the epilogue (here from the bias) has no int8 code: the kernels and the reference write
    0, never a saturated code or the poison; +-inf saturate; NaN-free rows are untouched."""
    x_q, w_q = torch.ones(3, 40, dtype=torch.int8, device=device), torch.ones(6, 40, dtype=torch.int8, device=device)
    ws = torch.ones(6, device=device)
    bias = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0, 0.0], device=device)
    want = [0, 127, 0 if act == "relu" else -127, 50, 30, 40]  # (4 + bias) / 0.1
    out = _int8_linear_triton(x_q, w_q, 0.1, ws, bias, None, act, "float16", out=poisoned((3, 6), torch.int8, device),
                              out_scale=0.1)
    ref = reference_int8_linear(x_q.cpu(), w_q.cpu(), 0.1, ws.cpu(), bias.cpu(), None, act, "float16", None, 0.1)
    assert out.cpu().tolist() == [want] * 3 and ref.tolist() == [want] * 3
    # the conv epilogue is the same code
    conv = int8_conv2d(torch.ones(1, 40, 2, 2, dtype=torch.int8, device=device), w_q.view(6, 1, 1, 40), 0.1, ws, bias,
                       activation=act, out_scale=0.1)
    assert conv.permute(0, 2, 3, 1).reshape(4, 6).cpu().tolist() == [want] * 4


def test_requant_ties_round_half_even(device):
    """Exact ties: acc * x_scale * w_scale lands on k + 0.5 codes (powers of two): round to even."""
    x_q = torch.tensor([[1], [3], [5], [-1], [-3], [127]], dtype=torch.int8, device=device)  # [6, 1]
    w_q = torch.ones(1, 1, dtype=torch.int8, device=device)
    ws = torch.ones(1, device=device)
    out = int8_linear(x_q, w_q, 0.5, ws, out_scale=1.0)  # y = 0.5, 1.5, 2.5, -0.5, -1.5, 63.5
    assert out.cpu().flatten().tolist() == [0, 2, 2, 0, -2, 64]
    sat = int8_linear(x_q, w_q, 0.5, ws, out_scale=0.25)  # 2, 6, 10, -2, -6, 254 -> 127
    assert sat.cpu().flatten().tolist() == [2, 6, 10, -2, -6, 127]


@pytest.mark.parametrize(
    "over,match,exc",
    [
        (dict(residual="int8"), r"residual_scale \(its per-tensor scale\) is required", ValueError),
        (dict(residual="float", residual_scale=0.1), r"residual_scale applies to an int8 residual only", ValueError),
        (dict(out_scale=0.0), r"out_scale must be a positive finite", ValueError),
        (dict(out_scale=torch.tensor(1.0)), r"out_scale must be a python float", TypeError),
        (dict(config=(64, 64, 32)), r"config must be 6 ints", ValueError),
    ],
)
def test_requant_argument_checks(over, match, exc):
    args = dict(x_q=_codes(1, 4, 5, 5, device="cpu"), w_q=_codes(3, 3, 3, 4, device="cpu"), x_scale=0.1,
                w_scale=torch.ones(3), padding=1)
    if over.get("residual") == "int8":
        over["residual"] = _codes(1, 3, 5, 5, device="cpu")
    elif over.get("residual") == "float":
        over["residual"] = torch.ones(1, 3, 5, 5)
    with pytest.raises(exc, match=match):
        int8_conv2d(**args, **over)


def test_opcheck_requant():
    torch.library.opcheck(torch.ops.bevdeploy.int8_conv2d.default,
                          (_codes(1, 4, 5, 5, device="cpu").contiguous(memory_format=torch.channels_last),
                           _codes(3, 3, 3, 4, device="cpu"), 0.1, torch.rand(3) + 0.1, torch.randn(3), [1, 1], [1, 1],
                           [1, 1], 1, _codes(1, 3, 5, 5, device="cpu"), "relu", "float16", 0.05, 0.2,
                           [32, 32, 32, 4, 4, 1]))
    torch.library.opcheck(torch.ops.bevdeploy.int8_linear.default,
                          (_codes(5, 8, device="cpu"), _codes(3, 8, device="cpu"), 0.1, torch.rand(3) + 0.1,
                           None, torch.randn(5, 3), "none", "float16", None, 0.3, None))


# ---------------------------------------------------------------------------------------------- the chain


def test_max_pool2d_int8_is_exact():
    from bevdeploy.quant.chain import max_pool2d_int8

    x = _codes(2, 5, 9, 11, device="cpu", g=torch.Generator().manual_seed(1))
    want = F.max_pool2d(x.float(), 3, 2, 1).to(torch.int8)
    assert torch.equal(max_pool2d_int8(x, 3, 2, 1), want)


def _bottleneck_stack():
    from torch import nn

    from bevdeploy.models.resnet import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    blocks = [Bottleneck(inplanes=8, planes=4, stride=2, downsample=down),
              Bottleneck(inplanes=16, planes=4), Bottleneck(inplanes=16, planes=4)]
    model = nn.Sequential(nn.Sequential(*blocks)).eval()
    for m in model.modules():  # non-trivial BN statistics, so the folded biases matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


#: Chained vs unchained int8 stack (same scales): they differ only where an fp16 intermediate and
#: the direct int8 epilogue round a code differently, so the floor is far above the int8 noise floor.
CHAIN_VS_UNCHAINED_SQNR_DB = 35.0
#: Either int8 stack against the float model (3 blocks, minmax calibration on the input itself).
INT8_VS_FLOAT_SQNR_DB = 20.0


def test_chained_bottlenecks_stay_int8_and_match_unchained(device):
    import copy

    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import Int8Bottleneck, chain_int8
    from bevdeploy.quant.modules import QuantConv2d, quantize_modules
    from bevdeploy.quant.sensitivity import sqnr_db

    model = _bottleneck_stack()
    fold_batchnorms(model)
    model = model.to(device)
    x = torch.randn(2, 8, 12, 10, device=device)
    table = calibrate(model, lambda m: m(x), "minmax")
    scales = {n: table.scale(n) for n in table.amax}
    with torch.no_grad():
        ref = model(x)
    plain, chained = copy.deepcopy(model), copy.deepcopy(model)
    quantize_modules(plain, scales, out_dtype=torch.float32)
    quantize_modules(chained, scales, out_dtype=torch.float32)
    writers = chain_int8(chained)
    blocks = [m for m in chained.modules() if isinstance(m, Int8Bottleneck)]
    assert len(blocks) == 3
    for m in chained.modules():  # weights pre-packed K-contiguous at conversion: [O, kh, kw, C] dense
        if isinstance(m, QuantConv2d):
            assert m.weight.is_contiguous() and m.weight.shape[1:] == (*m.kernel_size, m.in_channels)
    # what writes int8: conv1/conv2 of every block, conv3 of the first two (the last one's output leaves)
    want = {f"0.{b}.conv{i}" for b in range(3) for i in (1, 2)} | {"0.0.conv3", "0.1.conv3"}
    assert set(writers) == want
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].dtype, out.dtype)))
             for name, m in chained.named_modules() if isinstance(m, (QuantConv2d, Int8Bottleneck))]
    with torch.no_grad():
        out_c = chained(x)
        out_p = plain(x)
    for h in hooks:
        h.remove()
    assert seen["0.0"] == (torch.float32, torch.int8) and seen["0.1"] == (torch.int8, torch.int8)
    assert seen["0.2"] == (torch.int8, torch.float32)  # the stack's output is float for its caller
    assert seen["0.1.conv1"] == (torch.int8, torch.int8) and seen["0.1.conv3"] == (torch.int8, torch.int8)
    assert seen["0.0.downsample.0"][0] == torch.float32 and seen["0.0.downsample.0"][1] == torch.float32
    assert out_c.dtype == torch.float32 and torch.isfinite(out_c).all()
    assert sqnr_db(out_p, out_c) > CHAIN_VS_UNCHAINED_SQNR_DB
    assert sqnr_db(ref, out_c) > INT8_VS_FLOAT_SQNR_DB and sqnr_db(ref, out_p) > INT8_VS_FLOAT_SQNR_DB


#: Floor of the int8 engine's maps against the float model (the un-chained engine test's floor).
ENGINE_SQNR_FLOOR_DB = 20.0


def test_bevdet_engine_with_chain(tmp_path, ops_on_references):
    """Reduced BEVDet engine, chain on: the same int8 scope as without the chain, int8 tensors from
    the stem through the backbone, neck and depth net and inside the BEV encoder, SQNR above the floor."""
    import copy

    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
    from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
    from bevdeploy.engine import Engine, build
    from bevdeploy.engine.deploy import apply_precision, fold_batchnorms, layer_precisions
    from bevdeploy.models import MODELS
    from bevdeploy.models.bevdet import HEAD_OUTPUTS, BEVPoolRanks
    from bevdeploy.quant.calibrate import CalibrationTable
    from bevdeploy.quant.sensitivity import sqnr_db
    from tests.engine.test_engine_bevdet import SMALL

    generate(tmp_path / "w", num_scenes=1, samples_per_scene=2, seed=5, image_size=(64, 192), progress=False)
    calib = DataSource(tmp_path / "w", SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=2)
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "c.engine", model_overrides=SMALL, calib=calib,
                 progress=False)
    engine = Engine.load(path, device="cpu")
    meta = engine.metadata
    writers = set(meta["int8_outputs"])
    assert "img_backbone.conv1" not in writers  # the 3-channel stem stays float by default (faster)
    for name in ("img_backbone.layer1.0.conv1", "img_backbone.layer1.0.conv3",
                 "img_backbone.layer3.5.conv3", "img_backbone.layer4.2.conv3", "img_neck.lateral_convs.0.conv",
                 "img_neck.fpn_convs.0.conv", "img_bev_encoder_backbone.layers.0.0.conv1",
                 "img_bev_encoder_neck.conv.0", "img_bev_encoder_neck.up2.1"):
        assert name in writers, name
    for name in ("img_neck.lateral_convs.1.conv", "img_view_transformer.depth_net",
                 "img_backbone.layer1.0.downsample.0", "img_bev_encoder_neck.up2.4"):
        assert name not in writers, name  # float consumers: upsample, softmax, the head, a residual
    # the int8 scope is the un-chained one
    torch.manual_seed(0)
    model = MODELS["bevdet-r50-cbgs"](**SMALL).eval()
    fold_batchnorms(model)
    table = CalibrationTable.load(f"{path}.calib.json")
    scales = {n: table.scale(n) for n in table.amax}
    plain = copy.deepcopy(model)
    from bevdeploy.engine.model_io import image_input_convs

    report = apply_precision(plain, "int8", scales=scales, keep_float=image_input_convs(plain), int8_chain=False)
    assert [list(r) for r in layer_precisions(plain, report, "int8")] == meta["layer_precisions"]
    # accuracy against the float model
    _, infos = None, load_infos(tmp_path / "w", SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    x = {k: v[None] for k, v in prepare_bevdet_inputs(infos[1], BEVDetPreprocess(input_size=SMALL["image_size"])).items()}
    ranks = engine.prepare(*(x[k] for k in GEOMETRY_KEYS))
    inputs = {"image": x["image"], **dict(zip(BEVPoolRanks._fields, ranks))}
    with torch.no_grad():
        ref = model(**inputs)
    out = engine(**inputs)
    for k in HEAD_OUTPUTS:
        assert torch.isfinite(out[k]).all() and sqnr_db(ref[k], out[k]) > ENGINE_SQNR_FLOOR_DB, k


def test_bevformer_base_backbone_and_fpn_chain(ops_on_references):
    """ResNet-101-DCN + 4-level FPN (BEVFormer-base), reduced input, on the references: the laterals
    take the int8 top-down sum and write int8 for their output convs; the int8 DCN conv2 of stages 3-4
    reads conv1's codes (with its offset conv) and writes conv3's; the chained outputs match the
    un-chained int8 module."""
    import copy

    from bevdeploy.eval.bench_convs import backbone_module
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import Int8FPN, chain_int8
    from bevdeploy.quant.modules import quantize_modules
    from bevdeploy.quant.sensitivity import sqnr_db

    model = backbone_module("bevformer-base")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    table = calibrate(model, lambda m: m(x), "minmax")
    scales = {n: table.scale(n) for n in table.amax}
    plain, chained = copy.deepcopy(model), copy.deepcopy(model)
    quantize_modules(plain, scales, out_dtype=torch.float32, deform_convs=True)
    quantize_modules(chained, scales, out_dtype=torch.float32, deform_convs=True)
    writers = set(chain_int8(chained))
    fpn = chained.img_neck
    assert isinstance(fpn, Int8FPN) and all(s is not None for s in fpn.lateral_scales)
    assert {f"img_neck.lateral_convs.{i}.conv" for i in range(3)} <= writers
    assert not any(n.startswith("img_neck.fpn_convs") for n in writers)  # the encoder reads them as floats
    assert "img_backbone.layer2.3.conv3" in writers  # C3 -> layer3 and the first lateral, all int8
    from bevdeploy.quant.modules import QuantDeformConv2d

    dcn = chained.img_backbone.layer3[0].conv2
    assert isinstance(dcn, QuantDeformConv2d) and dcn.activation == "relu"
    assert {"img_backbone.layer3.0.conv1", "img_backbone.layer3.0.conv2", "img_backbone.layer4.2.conv2"} <= writers
    assert dcn.conv_offset.input_scale == dcn.input_scale == chained.img_backbone.layer3[0].conv1.out_scale
    assert dcn.out_scale == chained.img_backbone.layer3[0].conv3.input_scale
    with torch.no_grad():
        ref, out_p, out_c = model(x), plain(x), chained(x)
    assert len(out_c) == 4
    keep = copy.deepcopy(plain)
    kept_writers = set(chain_int8(keep, int8_identity=False))  # float block boundaries
    assert "img_backbone.layer2.2.conv3" not in kept_writers and "img_backbone.layer2.3.conv2" in kept_writers
    assert "img_backbone.layer2.3.conv3" in kept_writers  # into a downsampling block: no identity to keep
    with torch.no_grad():
        out_k = keep(x)
    for r, k, c in zip(ref, out_k, out_c):
        assert sqnr_db(r, k) > sqnr_db(r, c)  # the float identity is the more accurate mode
    for r, p, c in zip(ref, out_p, out_c):
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        # measured (seed 3, int8 DCNs): chained vs un-chained 25.7-37.9 dB per level, chained vs float
        # 26.1-37.8 dB (float DCNs: 26.1-37.8), un-chained vs float 33.5-44.4 dB: the int8 identity of 33
        # blocks costs ~6 dB (random weights)
        assert sqnr_db(p, c) > 24.0 and sqnr_db(r, c) > 24.0, (sqnr_db(p, c), sqnr_db(r, c))


#: Chained vs un-chained reduced BEVFormer (same int8 layers, same scales), encoder int8 only.
#: int8 (fp32 storage): the FFN's hidden codes differ only at .5 ties (fp32 epilogue x 1/scale vs fp32
#: storage / scale); measured bit-identical outputs (seed 0). int8-fp16: the un-chained FFN rounds
#: the hidden activation to fp16 before quantizing it, the chained one does not; measured 45.1 dB
#: (bev_embed), 71.8 / 74.6 dB (heads), the chained model 0.07 dB closer to the float one on bev_embed.
BEVFORMER_CHAIN_SQNR_DB = {"int8": 60.0, "int8-fp16": 40.0}
#: The chained model may not be less accurate than the un-chained one (vs float) by more than this.
BEVFORMER_CHAIN_LOSS_DB = 0.5


@pytest.mark.parametrize("precision", ["int8", "int8-fp16"])
def test_bevformer_encoder_ffn_chain(ops_on_references, precision):
    """Reduced BEVFormer-tiny (the engine tests' config, two encoder layers), int8 deploy form with
    and without the chain: the same layers run int8; in the encoder exactly the FFNs' first linears
    write int8 (ReLU fused, at the second linear's input scale), which reads them as they are; the
    outputs match the un-chained model above the floor."""
    import copy

    from bevdeploy.engine.deploy import apply_precision, fold_batchnorms, layer_precisions
    from bevdeploy.models import MODELS
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import chain_int8
    from bevdeploy.quant.modules import QuantLinear
    from bevdeploy.quant.sensitivity import sqnr_db
    from tests.engine.test_engine import TINY, _inputs

    layers = 2
    torch.manual_seed(0)
    model = MODELS["bevformer-tiny"](**{**TINY, "num_encoder_layers": layers}).eval()
    fold_batchnorms(model)
    x = _inputs(seed=1)
    table = calibrate(model, lambda m: m(**x), "minmax")
    scales = {n: table.scale(n) for n in table.amax}
    with torch.no_grad():
        ref = model(**x)
    plain, chained = copy.deepcopy(model), copy.deepcopy(model)
    enc = "pts_bbox_head.transformer.encoder."
    # the encoder alone goes int8, so the FFN chain is the only difference (the backbone's has its own test)
    rep_p = apply_precision(plain, precision, scales=scales, scope=(enc,), int8_chain=False)
    rep_c = apply_precision(chained, precision, scales=scales, scope=(enc,), int8_chain=True)
    assert layer_precisions(plain, rep_p, precision) == layer_precisions(chained, rep_c, precision)  # same layers
    enc_int8 = {n for n, m in chained.named_modules() if n.startswith(enc) and isinstance(m, QuantLinear)}
    assert len(enc_int8) == 10 * layers  # TSA 4, SCA 4 (offsets, weights, value and output projections), FFN 2
    writers = {n for n, m in chained.named_modules() if getattr(m, "out_scale", None) is not None}
    fc1 = {f"{enc}layers.{i}.ffns.0.layers.0.0" for i in range(layers)}
    assert writers == fc1
    assert not any(getattr(m, "out_scale", None) is not None for m in plain.modules())
    assert chain_int8(copy.deepcopy(plain)) == sorted(fc1)  # what chain_int8 reports, in module order
    mods = dict(chained.named_modules())
    for i in range(layers):
        ffn = f"{enc}layers.{i}.ffns.0.layers."
        a, b = mods[ffn + "0.0"], mods[ffn + "1"]
        assert a.activation == "relu" and a.out_scale == b.input_scale == scales[ffn + "1"]
        assert type(mods[ffn + "0.1"]) is torch.nn.Identity  # the ReLU runs in the epilogue
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].dtype, out.dtype)))
             for name, m in chained.named_modules() if name.startswith(enc) and isinstance(m, QuantLinear)]
    dtype = torch.float16 if precision == "int8-fp16" else torch.float32
    xd = {k: v.to(dtype) if k in ("image", "prev_bev") else v for k, v in x.items()}  # the engine's input dtypes
    with torch.no_grad():
        out_c = chained(**xd)
        out_p = plain(**xd)
    for h in hooks:
        h.remove()
    assert set(seen) == enc_int8
    for name, (din, dout) in seen.items():
        assert dout == (torch.int8 if name in fc1 else dtype), name
        assert din == (torch.int8 if name.endswith("ffns.0.layers.1") else dtype), name
    for k in ref:
        c, p = out_c[k].float(), out_p[k].float()
        assert torch.isfinite(c).all(), k
        assert sqnr_db(p, c) > BEVFORMER_CHAIN_SQNR_DB[precision], (k, sqnr_db(p, c))
        assert sqnr_db(ref[k], c) > ENGINE_SQNR_FLOOR_DB, (k, sqnr_db(ref[k], c))
        assert sqnr_db(ref[k], c) > sqnr_db(ref[k], p) - BEVFORMER_CHAIN_LOSS_DB, k


@pytest.mark.parametrize("fuse_relu", [True, False])
def test_ffn_chain_fuses_relu_either_way(device, fuse_relu):
    """An ``FFN`` converted with or without ``fuse_relu``: chained, its first linear runs the ReLU in
    the epilogue and writes int8 codes (the int8 kernel here), with the same result both ways."""
    import copy

    from torch import nn

    from bevdeploy.models.bevformer import FFN
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import chain_int8
    from bevdeploy.quant.modules import quantize_modules
    from bevdeploy.quant.sensitivity import sqnr_db

    torch.manual_seed(0)
    model = nn.Sequential(FFN(embed_dims=24, feedforward_channels=40)).eval().to(device)
    x = torch.randn(2, 7, 24, device=device)
    table = calibrate(model, lambda m: m(x), "minmax")
    scales = {n: table.scale(n) for n in table.amax}
    plain = copy.deepcopy(model)
    quantize_modules(plain, scales, out_dtype=torch.float32)  # un-chained reference (ReLU fused)
    chained = copy.deepcopy(model)
    quantize_modules(chained, scales, fuse_relu=fuse_relu, out_dtype=torch.float32)
    assert isinstance(chained[0].layers[0][1], nn.Identity if fuse_relu else nn.ReLU)
    assert chain_int8(chained) == ["0.layers.0.0"]
    fc1 = chained[0].layers[0][0]
    assert fc1.activation == "relu" and isinstance(chained[0].layers[0][1], nn.Identity)
    assert fc1.out_scale == scales["0.layers.1"]
    with torch.no_grad():
        ref, out_p, out_c = model(x), plain(x), chained(x)
        hidden = chained[0].layers[0](x)
    assert hidden.dtype == torch.int8 and (hidden >= 0).all()
    assert out_c.dtype == torch.float32 and sqnr_db(out_p, out_c) > 60.0 and sqnr_db(ref, out_c) > 30.0
