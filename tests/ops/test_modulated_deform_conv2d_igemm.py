"""The implicit-GEMM DCNv2 kernel (fp16 / fp16x2 default path, fp32 on request) against the reference.

Through Triton's interpreter on CPU-only machines (tiny shapes: it is slow), compiled on a GPU."""

import io
import math

import pytest
import torch

from bevdeploy.ops import modulated_deform_conv2d as mdc
from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack, modulated_deform_conv2d, reference
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close

_DT = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16}

# (N, Cin, Cout, H, W, stride, padding, dilation, deform_groups, bias)
CASES = {
    # Cin and Cout not multiples of 16 (nor of any block), odd H/W
    "odd": (2, 20, 36, 7, 9, 1, 1, 1, 1, True),
    # stride 2, no bias, two deform groups of 12 channels (a channel block straddles nothing: masked tail)
    "s2-dg2": (1, 24, 20, 9, 7, 2, 1, 1, 2, False),
    # asymmetric stride/padding/dilation, three deform groups of 2 channels
    "pairs-dg3": (1, 6, 5, 7, 9, (1, 2), (2, 1), (2, 1), 3, True),
}


def _out_hw(h, w, k, stride, padding, dilation):
    s, p, d = mdc._pairs(stride, padding, dilation)
    return ((h + 2 * p[0] - d[0] * (k - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k - 1) - 1) // s[1] + 1)


def _make(case, device, variant, seed=0):
    """Fresh random inputs in the variant's storage; offsets of a few pixels push many samples off the
    image, every 7th offset channel points 40 pixels away (the zero-padding path), one offset is NaN."""
    n, cin, cout, h, w, s, p, d, dg, has_bias = case
    gen = torch.Generator().manual_seed(seed)
    ho, wo = _out_hw(h, w, 3, s, p, d)
    x = torch.randn(n, cin, h, w, generator=gen)
    off = torch.randn(n, 2 * dg * 9, ho, wo, generator=gen) * 2.5
    off[:, 3::7] = 40.0 * torch.sign(off[:, 3::7])
    off[0, 1, 0, 0] = float("nan")  # mmcv: a NaN position samples zero
    m = torch.rand(n, dg * 9, ho, wo, generator=gen)
    wt = torch.randn(cout, cin, 3, 3, generator=gen) / math.sqrt(cin * 9)
    b = torch.randn(cout, generator=gen) if has_bias else None
    dt = _DT[variant]
    x = x.to(dt).contiguous(memory_format=torch.channels_last).to(device)
    wt = wt.to(dt).contiguous(memory_format=torch.channels_last).to(device)
    if variant != "fp32":  # offsets/mask as an fp16 model passes them
        off, m = off.half(), m.half()
    return x, off.to(device), m.to(device), wt, None if b is None else b.to(device), dict(
        stride=s, padding=p, dilation=d, deform_groups=dg)


def _ref64(x, off, m, wt, b, kw):
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return reference(d(x), d(off), d(m), d(wt), d(b), kw["stride"], kw["padding"], kw["dilation"], 1,
                     kw["deform_groups"])


def _poisoned_cl(shape, dtype, device):
    n, c, h, w = shape
    return torch.full((n, h, w, c), float("nan"), dtype=dtype, device=device).permute(0, 3, 1, 2)


def _call(x, off, m, wt, b, kw, variant, **extra):
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    out = _poisoned_cl((x.shape[0], wt.shape[0], *off.shape[-2:]), mdc.VARIANT_OUTPUT_DTYPE[variant], x.device)
    y = mdc._modulated_deform_conv2d_igemm(x, off, m, wt, b, s, p, d, kw["deform_groups"], variant, out=out, **extra)
    assert y is out  # the NaN-poisoned buffer was written in place, every element checked below
    return y


@pytest.mark.parametrize("variant", ["fp16", "fp16x2", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_igemm_matches_reference(device, variant, name):
    x, off, m, wt, b, kw = _make(CASES[name], device, variant, seed=hash(name) % 1000)
    want = _ref64(x, off, m, wt, b, kw)
    assert torch.isfinite(want).all()
    # the default (interpreter: one large block) and forced small blocks: several pixel and output-channel
    # tiles, partial channel blocks; both operand orders of the MMA and both chunk orders
    for config in (None, (16, 16, 16, 1, 1), (32, 16, 16, 1, 1, True, True)):
        y = _call(x, off, m, wt, b, kw, variant, config=config)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_rel_close(y, want, REL_TOL[variant], name=f"{variant} {name} {config}")


def test_igemm_nan_input_is_not_hidden(device):
    # a NaN in the input where a sample reads it must reach the output (the check then fails loudly)
    x, off, m, wt, b, kw = _make(CASES["odd"], device, "fp16", seed=11)
    off.zero_()
    x[0, 3, 2, 2] = float("nan")
    y = _call(x, off, m, wt, b, kw, "fp16")
    assert torch.isnan(y[0, :, 2, 2]).all() and torch.isfinite(y[1]).all()


def test_igemm_arbitrary_strides(device):
    # NCHW input straight into the kernel (no relayout), offset as a channel slice of the offset conv's
    # output (channels-last, 27 channels), mask a strided view
    x, off, m, wt, b, kw = _make(CASES["odd"], device, "fp16", seed=12)
    want = _ref64(x, off, m, wt, b, kw)
    conv_out = torch.cat((off, m), 1).contiguous(memory_format=torch.channels_last)
    offv, mv = conv_out[:, :18], conv_out[:, 18:]
    assert not (offv.is_contiguous() or mv.is_contiguous())
    y = _call(x.contiguous(), offv, mv, wt.contiguous(), b, kw, "fp16", relayout=False)
    assert_rel_close(y, want, REL_TOL["fp16"])


def test_dispatch_and_layout(device):
    x, off, m, wt, b, kw = _make(CASES["odd"], device, "fp16", seed=13)
    want = _ref64(x, off, m, wt, b, kw)
    y = modulated_deform_conv2d(x, off, m, wt, b, **kw)  # fp16, groups 1: the implicit GEMM
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, want, REL_TOL["fp16"])
    y32 = modulated_deform_conv2d(x.float(), off.float(), m.float(), wt.float(), b, **kw)  # fp32: plan kernel
    assert y32.is_contiguous()
    # groups > 1 falls back to the plan kernel (NCHW output)
    wg = wt[:, :10].contiguous()
    yg = modulated_deform_conv2d(x, off, m, wg, b, groups=2, **kw)
    assert yg.is_contiguous()
    wantg = reference(x.double().cpu(), off.double().cpu(), m.double().cpu(), wg.double().cpu(),
                      None if b is None else b.double().cpu(), kw["stride"], kw["padding"], kw["dilation"], 2,
                      kw["deform_groups"])
    assert_rel_close(yg, wantg, REL_TOL["fp16"])


def test_igemm_switch_off(device, monkeypatch):
    monkeypatch.setenv("BEVDEPLOY_DCN_IGEMM", "0")
    x, off, m, wt, b, kw = _make(CASES["s2-dg2"], device, "fp16x2", seed=14)
    y = modulated_deform_conv2d(x, off, m, wt, b, **kw, variant="fp16x2")
    assert y.is_contiguous()
    assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL["fp16x2"])


def test_fake_matches_real_strides(monkeypatch):
    # the fake (export/compile) and the op agree on channels-last output where the implicit GEMM runs,
    # on the CPU reference path as well
    monkeypatch.setattr(mdc, "use_triton", lambda t: False)
    x, off, m, wt, b, kw = _make(CASES["odd"], "cpu", "fp16", seed=15)
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    args = (x, off, m, wt, b, s, p, d, 1, kw["deform_groups"], "fp16", 1.0, None)
    torch.library.opcheck(torch.ops.bevdeploy.modulated_deform_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))


class _Pack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dcn = ModulatedDeformConv2dPack(20, 12, 3, padding=1, deform_groups=2)
        with torch.no_grad():  # non-zero offsets: conv_offset is zero-initialised
            self.dcn.conv_offset.weight.normal_(0, 0.3)
            self.dcn.conv_offset.bias.normal_(0, 1.0)

    def forward(self, x):
        return torch.relu(self.dcn(x))


def test_export_round_trip_fp16(device):
    torch.manual_seed(16)
    mod = _Pack().to(device=device, dtype=torch.float16)
    x = torch.randn(1, 20, 5, 7, device=device, dtype=torch.float16)
    with torch.no_grad():
        eager = mod(x)
        ep = torch.export.export(mod, (x,))
        nodes = [n for n in ep.graph.nodes
                 if n.op == "call_function" and "bevdeploy.modulated_deform_conv2d" in str(n.target)]
        assert len(nodes) == 1
        fake = nodes[0].meta["val"]
        assert fake.is_contiguous(memory_format=torch.channels_last)
        # the offsets reach the op as a slice of the offset conv's output (no concatenation)
        assert not any("cat" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        got = torch.export.load(buf).module()(x)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    p = mod.dcn
    out = p.conv_offset(x).double()
    want = torch.relu(reference(x.double().cpu(), out[:, :36].cpu(), torch.sigmoid(out[:, 36:]).cpu(),
                                p.weight.double().cpu(), p.bias.double().cpu(), 1, 1, 1, 1, 2))
    assert_rel_close(eager, want, REL_TOL["fp16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["fp16", "fp16x2", "fp32"])
def test_gpu_resnet_like_shape(variant):
    # a stage-3-like layer (channels-last, 3x3, 256 -> 256) through the tuned launch path
    case = (2, 256, 256, 29, 50, 1, 1, 1, 1, True)
    x, off, m, wt, b, kw = _make(case, "cuda", variant, seed=17)
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    y = mdc._modulated_deform_conv2d_igemm(x, off, m, wt, b, s, p, d, 1, variant)
    assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL[variant])


def test_igemm_carried_sampling(device, monkeypatch):
    # the experimental switch: a kernel point's sampling computed once and carried over its channel blocks
    monkeypatch.setattr(mdc, "_IGEMM_CARRY", True)
    x, off, m, wt, b, kw = _make(CASES["s2-dg2"], device, "fp16", seed=18)
    y = _call(x, off, m, wt, b, kw, "fp16", config=(16, 16, 16, 1, 1))
    assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL["fp16"])


# ---- int8: int8 codes gathered, blended in fp16, re-quantised, int8 x int8 -> int32 MMA, int8 epilogue ----

def _int8_operands(case, device, seed):
    """int8 codes of the case's input (per-tensor scale) and weight (per output channel)."""
    x, off, m, wt, b, kw = _make(case, "cpu", "fp32", seed=seed)
    s_x = x.abs().max().item() / 127.0
    xq = torch.clamp(torch.round(x / s_x), -127, 127).to(torch.int8).contiguous(memory_format=torch.channels_last)
    wq, s_w = mdc.quantize_weight_per_channel(wt)
    t = lambda v: None if v is None else v.to(device)  # noqa: E731
    return t(xq), s_x, t(off.half()), t(m.half()), t(wq), t(s_w), t(b), kw


def _int8_ref(xq, s_x, off, m, wq, s_w, b, kw):
    """float64 DCN of the dequantised codes; and the bound of the int8 result around it: each blended
    sample is off by at most 0.69 codes (rounded to a code with ``int8_mma``; else the fp16 blend's own
    rounding, far less), summed through |w| per output channel, plus the fp16 output rounding."""
    want = _ref64(xq.double() * s_x, off, m, wq.double() * s_w.double()[:, None, None, None], b, kw)
    row = (s_w.double().cpu() * wq.double().abs().flatten(1).sum(1).cpu()).max().item()
    return want, s_x * row * 0.75 + want.abs().max().item() * 2.0**-10 + 1e-6


def _call_int8(xq, s_x, off, m, wq, s_w, b, kw, **extra):
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    dtype = torch.int8 if extra.get("out_scale") is not None else torch.float16
    shape = (xq.shape[0], wq.shape[0], *off.shape[-2:])
    out = (_poisoned_cl(shape, dtype, xq.device) if dtype == torch.float16
           else torch.full((shape[0], shape[2], shape[3], shape[1]), -128, dtype=dtype, device=xq.device).permute(0, 3, 1, 2))
    y = mdc._modulated_deform_conv2d_igemm(xq, off, m, wq, b, s, p, d, kw["deform_groups"], "int8", out=out,
                                           input_scale=s_x, weight_scale=s_w, **extra)
    assert y is out and y.is_contiguous(memory_format=torch.channels_last)
    return y


@pytest.mark.parametrize("name", list(CASES))
def test_igemm_int8_bounded_by_scales(device, name):
    xq, s_x, off, m, wq, s_w, b, kw = _int8_operands(CASES[name], device, seed=hash(name) % 1000 + 1)
    want, bound = _int8_ref(xq, s_x, off, m, wq, s_w, b, kw)
    # default, small blocks (several pixel / channel tiles, masked channel tails: Cin 20, 6 per group),
    # and the swapped / tap-inner forms
    for config in (None, (16, 16, 32, 1, 1), (32, 16, 32, 1, 1, True, True)):
        y = _call_int8(xq, s_x, off, m, wq, s_w, b, kw, config=config)
        assert_int8_close(y, want, bound, name=f"int8 {name} {config}")
    # the experimental form: each blended sample rounded to a code, int8 MMA (within the same bound)
    y = _call_int8(xq, s_x, off, m, wq, s_w, b, kw, config=(16, 16, 32, 1, 1), int8_mma=True)
    assert_int8_close(y, want, bound, name=f"int8 MMA {name}")


def test_igemm_int8_fused_relu_and_requantisation(device):
    # relu + int8 codes of out_scale (symmetric, then with zero points); out_scale small enough that the
    # largest outputs saturate at 127 where the zero point leaves fewer than 180 codes above zero
    xq, s_x, off, m, wq, s_w, b, kw = _int8_operands(CASES["odd"], device, seed=21)
    want, bound = _int8_ref(xq, s_x, off, m, wq, s_w, b, kw)
    relu = torch.relu(want)
    y16 = _call_int8(xq, s_x, off, m, wq, s_w, b, kw, activation="relu")
    assert (y16 >= 0).all()
    assert_int8_close(y16, relu, bound)
    out_scale = relu.max().item() / 180.0  # outputs above 0.7 x the largest saturate at 127
    for zp in (0, -128, 17):
        codes = _call_int8(xq, s_x, off, m, wq, s_w, b, kw, activation="relu", out_scale=out_scale,
                           out_zero_point=zp)
        assert codes.dtype == torch.int8
        lo = -127 if zp == 0 else -128
        want_codes = torch.clamp(torch.round(relu / out_scale) + zp, lo, 127)
        # within the fp16-blend bound in codes, plus one for the rounding of a value near a tie
        worst = (codes.double().cpu() - want_codes).abs().max().item()
        assert worst <= bound / out_scale + 1, f"zp {zp}: {worst} codes off"
        assert (codes.cpu() == zp).sum() > 0  # relu's zeros
        if 180 + zp > 127:  # the largest outputs' codes pass 127: saturated
            assert (codes.cpu() == 127).sum() > 0


def test_igemm_int8_cpu_path_matches_kernel(device):
    # the op's CPU implementation (what the engine's exported graph traces, and the reference autograd)
    # applies the same epilogue; the kernel's fp16 blend may move a column code by one near a tie
    xq, s_x, off, m, wq, s_w, b, kw = _int8_operands(CASES["s2-dg2"], device, seed=22)
    want, bound = _int8_ref(xq, s_x, off, m, wq, s_w, b, kw)
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    cpu = mdc._cpu_impl(xq.cpu(), off.cpu(), m.cpu(), wq.cpu(), None if b is None else b.cpu(), s, p, d, 1,
                        kw["deform_groups"], "int8", s_x, s_w.cpu(), "relu", None, 0)
    assert_int8_close(cpu, torch.relu(want), bound)
    out_scale = want.abs().max().item() / 127
    codes = mdc._cpu_impl(xq.cpu(), off.cpu(), m.cpu(), wq.cpu(), None if b is None else b.cpu(), s, p, d, 1,
                          kw["deform_groups"], "int8", s_x, s_w.cpu(), "relu", out_scale, 5)
    assert codes.dtype == torch.int8 and codes.min() >= 5
    y = modulated_deform_conv2d(xq, off, m, wq, b, variant="int8", input_scale=s_x, weight_scale=s_w,
                                activation="relu", out_scale=out_scale, out_zero_point=5, **kw)
    assert y.dtype == torch.int8 and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.cpu().int() - codes.int()).abs().max().item() <= bound / out_scale + 1


@pytest.mark.parametrize("bad, match", [
    (dict(activation="gelu"), r"activation must be one of"),
    (dict(out_scale=0.0), r"out_scale must be a finite positive"),
    (dict(out_scale=float("nan")), r"out_scale must be a finite positive"),
    (dict(out_zero_point=3), r"out_zero_point needs out_scale"),
    (dict(out_scale=0.1, out_zero_point=200), r"out_zero_point must be in"),
    (dict(input_zero_point=-129), r"input_zero_point must be in"),
])
def test_int8_epilogue_arguments_checked(bad, match):
    xq, s_x, off, m, wq, s_w, b, kw = _int8_operands(CASES["odd"], "cpu", seed=23)
    with pytest.raises(ValueError, match=match):
        modulated_deform_conv2d(xq, off, m, wq, b, variant="int8", input_scale=s_x, weight_scale=s_w, **kw, **bad)
    x, off, m, wt, b, kw = _make(CASES["odd"], "cpu", "fp16")
    with pytest.raises(ValueError, match=r"need variant 'int8'"):
        modulated_deform_conv2d(x, off, m, wt, b, out_scale=0.1, **kw)
    with pytest.raises(ValueError, match=r"activation with variant 'int8' needs groups == 1"):
        modulated_deform_conv2d(xq, off, m, wq[:, :10].contiguous(), b, groups=2, variant="int8", input_scale=s_x,
                                weight_scale=s_w, activation="relu", **kw)


@pytest.mark.parametrize("variant", ["fp16", "fp16x2", "fp32"])
def test_float_variants_apply_the_relu(device, variant):
    """activation="relu" on a float DCN (the deploy form's fused ResNet blocks): in the implicit GEMM's epilogue
    (small blocks: several tiles, both operand orders), through the op, and after the plan kernel (groups 2)."""
    x, off, m, wt, b, kw = _make(CASES["odd"], device, variant, seed=31)
    want = _ref64(x, off, m, wt, b, kw)
    assert (want < 0).float().mean() > 0.3  # the ReLU has work to do
    for config in (None, (16, 16, 16, 1, 1), (32, 16, 16, 1, 1, True, True)):
        y = _call(x, off, m, wt, b, kw, variant, config=config, activation="relu")
        assert_rel_close(y, torch.relu(want), REL_TOL[variant], name=f"{variant} {config}")
        assert (y >= 0).all()
    y = modulated_deform_conv2d(x, off, m, wt, b, **kw, variant=variant, activation="relu")
    assert_rel_close(y, torch.relu(want), REL_TOL[variant])
    wg = wt[:, :10].contiguous()
    wantg = reference(x.double().cpu(), off.double().cpu(), m.double().cpu(), wg.double().cpu(),
                      None if b is None else b.double().cpu(), kw["stride"], kw["padding"], kw["dilation"], 2,
                      kw["deform_groups"])
    yg = modulated_deform_conv2d(x, off, m, wg, b, groups=2, **kw, variant=variant, activation="relu")
    assert_rel_close(yg, torch.relu(wantg), REL_TOL[variant])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int8_resnet_like_shape():
    # a stage-3-like layer through the tuned launch path, int8 codes out
    xq, s_x, off, m, wq, s_w, b, kw = _int8_operands((2, 256, 256, 29, 50, 1, 1, 1, 1, True), "cuda", seed=24)
    want, bound = _int8_ref(xq, s_x, off, m, wq, s_w, b, kw)
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    y = mdc._modulated_deform_conv2d_igemm(xq, off, m, wq, b, s, p, d, 1, "int8", input_scale=s_x, weight_scale=s_w)
    assert_int8_close(y, want, bound)
    out_scale = want.abs().max().item() / 127
    codes = mdc._modulated_deform_conv2d_igemm(xq, off, m, wq, b, s, p, d, 1, "int8", input_scale=s_x,
                                               weight_scale=s_w, activation="relu", out_scale=out_scale)
    assert (codes.double().cpu() - torch.round(torch.relu(want) / out_scale)).abs().max() <= bound / out_scale + 1


@pytest.mark.parametrize("zp", [-128, -37, 90])
def test_igemm_int8_input_zero_point(device, zp):
    # asymmetric input codes (a ReLU output: x >= 0 over the full code range): the samples are taken of
    # q - z, so a sample outside the image (code padding) still reads the value 0
    x, off, m, wt, b, kw = _make(CASES["s2-dg2"], "cpu", "fp32", seed=31 + zp)
    x = torch.relu(x) - (0.0 if zp == -128 else 0.4)  # zp -128: one-sided; others: a shifted range
    lo, hi = x.min().item(), x.max().item()
    s_x = (hi - lo) / 255.0
    xq = torch.clamp(torch.round(x / s_x) + zp, -128, 127).to(torch.int8).contiguous(memory_format=torch.channels_last)
    wq, s_w = mdc.quantize_weight_per_channel(wt)
    t = lambda v: None if v is None else v.to(device)  # noqa: E731
    xq, off, m, wq, s_w, b = t(xq), t(off.half()), t(m.half()), t(wq), t(s_w), t(b)
    want, bound = _int8_ref(xq.double() - zp, s_x, off, m, wq, s_w, b, kw)
    y = _call_int8(xq, s_x, off, m, wq, s_w, b, kw, input_zero_point=zp, config=(16, 16, 32, 1, 1))
    assert_int8_close(y, want, bound, name=f"zero point {zp}")
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    cpu = mdc._cpu_impl(xq.cpu(), off.cpu(), m.cpu(), wq.cpu(), None if b is None else b.cpu(), s, p, d, 1,
                        kw["deform_groups"], "int8", s_x, s_w.cpu(), "none", None, 0, zp)
    assert_int8_close(cpu, want, bound)
    with pytest.raises(NotImplementedError, match="no input_zero_point"):
        _call_int8(xq, s_x, off, m, wq, s_w, b, kw, input_zero_point=zp, int8_mma=True)
