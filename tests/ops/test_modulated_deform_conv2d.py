import io
import math

import pytest
import torch
import torch.nn.functional as F

from bevdeploy.ops import modulated_deform_conv2d as mdc  # the module (the package does not re-export)
from bevdeploy.ops.modulated_deform_conv2d import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    _modulated_deform_conv2d_triton,
    modulated_deform_conv2d,
    quantize_weight_per_channel,
    reference,
)
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

# (N, Cin, Cout, H, W, stride, padding, dilation, groups, deform_groups, bias)
CASES = {
    "s1": (2, 6, 5, 7, 9, 1, 1, 1, 1, 1, True),
    "s2-d2-g2-dg2": (2, 6, 4, 7, 9, 2, 1, 2, 2, 2, False),
    # deform groups straddle conv groups (3 dg of 2 channels over 2 groups of 3): uneven segments
    "pairs-g2-dg3": (1, 6, 4, 7, 9, (1, 2), (2, 1), (2, 1), 2, 3, True),
}


def _out_hw(h, w, k, stride, padding, dilation):
    s, p, d = mdc._pairs(stride, padding, dilation)
    return ((h + 2 * p[0] - d[0] * (k - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k - 1) - 1) // s[1] + 1)


def _make(case, device, k=3, seed=0):
    n, cin, cout, h, w, s, p, d, g, dg, has_bias = case
    gen = torch.Generator().manual_seed(seed)
    ho, wo = _out_hw(h, w, k, s, p, d)
    x = torch.randn(n, cin, h, w, generator=gen)
    # offsets of a few pixels push many samples off the image; a slice goes far outside
    off = torch.randn(n, 2 * dg * k * k, ho, wo, generator=gen) * 2.5
    off[:, 3::7] = 40.0 * torch.sign(off[:, 3::7])
    m = torch.rand(n, dg * k * k, ho, wo, generator=gen)
    wt = torch.randn(cout, cin // g, k, k, generator=gen) / math.sqrt(cin // g * k * k)
    b = torch.randn(cout, generator=gen) if has_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(off), to(m), to(wt), to(b), dict(stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)


def _ref64(x, off, m, wt, b, kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference(d(x), d(off), d(m), d(wt), d(b), **kw)


def _call_triton(x, off, m, wt, b, kw, variant, input_scale=1.0, weight_scale=None, **extra):
    s, p, d = mdc._pairs(kw["stride"], kw["padding"], kw["dilation"])
    n, cout = x.shape[0], wt.shape[0]
    out = poisoned((n, cout, *off.shape[-2:]), mdc.VARIANT_OUTPUT_DTYPE[variant], x.device)
    y = _modulated_deform_conv2d_triton(x, off, m, wt, b, list(s), list(p), list(d), kw["groups"],
                                        kw["deform_groups"], variant, input_scale, weight_scale, out=out, **extra)
    assert y is out
    return y


def _naive_mmcv(x, off, msk, w, b, stride, padding, dilation, groups, deform_groups):
    """mmcv's im2col kernel transcribed as scalar loops (modulated_deform_conv_cuda_kernel.cuh)."""
    (sh, sw), (ph, pw), (dh, dw) = mdc._pairs(stride, padding, dilation)
    n_, c_, h_, w_ = x.shape
    cout, cg, kh, kw = w.shape
    ho_, wo_ = off.shape[-2:]
    cd = c_ // deform_groups
    out = torch.zeros(n_, cout, ho_, wo_, dtype=torch.float64)

    def bilinear(img, hh, ww):
        if not (hh > -1 and ww > -1 and hh < h_ and ww < w_):
            return 0.0
        hl, wl = math.floor(hh), math.floor(ww)
        lh, lw = hh - hl, ww - wl

        def v(yy, xx):
            return img[yy, xx].item() if 0 <= yy < h_ and 0 <= xx < w_ else 0.0

        return ((1 - lh) * (1 - lw) * v(hl, wl) + (1 - lh) * lw * v(hl, wl + 1) + lh * (1 - lw) * v(hl + 1, wl)
                + lh * lw * v(hl + 1, wl + 1))

    for n in range(n_):
        for o in range(cout):
            g = o // (cout // groups)
            for ho in range(ho_):
                for wo in range(wo_):
                    acc = 0.0 if b is None else b[o].item()
                    for cl in range(cg):
                        c = g * cg + cl
                        dgi = c // cd
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = off[n, dgi * 2 * kh * kw + 2 * k, ho, wo].item()
                                dx = off[n, dgi * 2 * kh * kw + 2 * k + 1, ho, wo].item()
                                mk = msk[n, dgi * kh * kw + k, ho, wo].item()
                                yy, xx = ho * sh - ph + i * dh + dy, wo * sw - pw + j * dw + dx
                                acc += w[o, cl, i, j].item() * mk * bilinear(x[n, c], yy, xx)
                    out[n, o, ho, wo] = acc
    return out


@pytest.mark.parametrize(
    "case",
    [
        (1, 4, 2, 5, 6, 1, 1, 1, 1, 1, True),
        (1, 4, 2, 5, 6, (2, 1), (1, 0), (1, 2), 2, 2, True),
        (1, 6, 2, 5, 6, 1, (2, 1), (2, 1), 2, 3, False),
    ],
)
def test_reference_is_mmcv(case):
    # offset channel 2k is dy and 2k+1 dx for kernel point k = i*kw + j, per deform group; NaN offsets read 0
    x, off, m, wt, b, kw = _make(case, "cpu", seed=1)
    off[0, 5, 0, 0] = float("nan")
    got = _ref64(x, off, m, wt, b, kw)
    want = _naive_mmcv(x.double(), off.double(), m.double(), wt.double(), None if b is None else b.double(), **kw)
    assert_rel_close(got, want, 1e-12)


def test_reference_zero_offsets_is_conv2d():
    x, _, _, wt, b, _ = _make(CASES["s1"], "cpu")
    x, wt, b = x.double(), wt.double(), b.double()
    for s, p, d, g in [(1, 1, 1, 1), (2, 0, 2, 1)]:
        w = wt if g == 1 else wt[:, : 6 // g]
        want = F.conv2d(x, w, b, s, p, d, g)
        off = torch.zeros(2, 18, *want.shape[-2:], dtype=torch.float64)
        m = torch.ones(2, 9, *want.shape[-2:], dtype=torch.float64)
        assert_rel_close(reference(x, off, m, w, b, s, p, d, g, 1), want, 1e-12)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(device, variant, name):
    x, off, m, wt, b, kw = _make(CASES[name], device)
    dt = torch.float32 if variant == "fp32" else torch.float16
    x, wt = x.to(dt), wt.to(dt)
    if variant != "fp32":  # offsets/mask/bias as an fp16 model would pass them
        off, m = off.half(), m.half()
    y = _call_triton(x, off, m, wt, b, kw, variant)
    assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL[variant])


def _int8_inputs(x, wt):
    s_x = x.abs().max().item() / 127.0
    xq = torch.clamp(torch.round(x / s_x), -127, 127).to(torch.int8)
    wq, s_w = quantize_weight_per_channel(wt)
    return xq, s_x, wq, s_w


def _int8_bound(s_x, wq, s_w, ref, code_err):
    """Each column value is re-quantised with s_x: |q - a| <= code_err codes (0.5 for exact rounding,
    0.69 with the kernel's fp16 blend: fp16 weights 2^-11 * 127 + four fp16 roundings of |x| < 128 at
    2^-5 each). Output error <= s_x * max_o(s_w[o] * sum_k |wq[o, k]|) * code_err, plus the fp16 output
    rounding (2^-11 relative, doubled)."""
    row = (s_w.double().cpu() * wq.double().abs().flatten(1).sum(1).cpu()).max().item()
    return s_x * row * code_err + ref.abs().max().item() * 2.0**-10 + 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_int8_bounded_by_scales(device, name):
    x, off, m, wt, b, kw = _make(CASES[name], device)
    xq, s_x, wq, s_w = _int8_inputs(x, wt)
    ref = _ref64(xq.double() * s_x, off, m, wq.double() * s_w.double()[:, None, None, None], b, kw)
    y = _call_triton(xq, off, m, wq, b, kw, "int8", s_x, s_w)
    assert y.dtype == torch.float16
    assert_int8_close(y, ref, _int8_bound(s_x, wq, s_w, ref, 0.75))
    # the CPU implementation of the variant rounds exactly
    cpu = mdc._cpu_impl(xq.cpu(), off.cpu(), m.cpu(), wq.cpu(), None if b is None else b.cpu(),
                        *[list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"])], kw["groups"],
                        kw["deform_groups"], "int8", s_x, s_w.cpu())
    assert_int8_close(cpu, ref, _int8_bound(s_x, wq, s_w, ref, 0.5))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_many_tiles_and_partial_blocks(device, variant):
    # small forced blocks: several pixel and output-channel tiles, channel blocks with a tail (24 = 16 + 8)
    case = (1, 24, 20, 5, 6, 1, 1, 1, 1, 1, True)
    x, off, m, wt, b, kw = _make(case, device, seed=3)
    if variant == "fp32":
        y = _call_triton(x, off, m, wt, b, kw, "fp32", config=(16, 16, 16, 1, 1))
        assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL["fp32"])
    else:
        xq, s_x, wq, s_w = _int8_inputs(x, wt)
        ref = _ref64(xq.double() * s_x, off, m, wq.double() * s_w.double()[:, None, None, None], b, kw)
        y = _call_triton(xq, off, m, wq, b, kw, "int8", s_x, s_w, config=(16, 16, 32, 1, 1))
        assert_int8_close(y, ref, _int8_bound(s_x, wq, s_w, ref, 0.75))


def test_non_contiguous_inputs(device):
    x, off, m, wt, b, kw = _make(CASES["s1"], device, seed=4)
    want = _ref64(x, off, m, wt, b, kw)
    # NCHW input and weight straight into the kernel (no relayout): arbitrary strides
    y = _call_triton(x.contiguous(), off, m, wt.contiguous(), b, kw, "fp32", relayout=False)
    assert_rel_close(y, want, REL_TOL["fp32"])
    # views: input every other channel of a wider tensor, channels-last offset, sliced mask
    xw = torch.zeros(2, 12, 7, 9, device=device)
    xw[:, ::2] = x
    xv = xw[:, ::2]
    offv = off.contiguous(memory_format=torch.channels_last)
    mw = torch.zeros(2, 9, 7, 18, device=device)
    mw[..., ::2] = m
    mv = mw[..., ::2]
    assert not (xv.is_contiguous() or offv.is_contiguous() or mv.is_contiguous())
    y = modulated_deform_conv2d(xv, offv, mv, wt, b, **kw)
    assert_rel_close(y, want, REL_TOL["fp32"])


def test_modules_equal_functional(device):
    torch.manual_seed(0)
    pack = ModulatedDeformConv2dPack(6, 5, 3, stride=1, padding=1, deform_groups=2).to(device)
    assert pack.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(pack.conv_offset.weight) == 0 and torch.count_nonzero(pack.conv_offset.bias) == 0
    assert list(pack.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert pack.conv_offset.out_channels == 3 * 2 * 9
    with torch.no_grad():
        pack.conv_offset.weight.normal_(0, 0.3)
        pack.conv_offset.bias.normal_(0, 1.0)
        pack.bias.normal_()
    x = torch.randn(2, 6, 7, 9, device=device)
    out = pack.conv_offset(x)
    o1, o2, mk = torch.chunk(out, 3, dim=1)
    off, m = torch.cat((o1, o2), dim=1), torch.sigmoid(mk)
    want = _ref64(x, off, m, pack.weight, pack.bias, dict(stride=1, padding=1, dilation=1, groups=1,
                                                          deform_groups=2))
    with torch.no_grad():
        got = pack(x)
        assert_rel_close(got, want, REL_TOL["fp32"])
        plain = ModulatedDeformConv2d(6, 5, 3, padding=1, deform_groups=2, bias=False).to(device)
        plain.weight.copy_(pack.weight)
        assert_rel_close(plain(x, off, m) + pack.bias[None, :, None, None], want, REL_TOL["fp32"])


def test_pack_loads_mmcv_state_dict():
    src = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    dst = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight, sd["weight"]) and dst.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dst.conv_offset.weight, sd["conv_offset.weight"])
    assert dst.state_dict()._metadata[""]["version"] == 2  # mmcv's ModulatedDeformConv2dPack._version


def test_quantize_weight_per_channel():
    w = torch.randn(5, 3, 3, 3)
    w[2] = 0
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (5,)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert s[2] == 1 and torch.count_nonzero(q[2]) == 0
    err = (q.float() * s[:, None, None, None] - w).abs().flatten(1).amax(1)
    assert (err <= s / 2 + 1e-7).all()


def _good():
    x = torch.randn(1, 4, 5, 5)
    return dict(input=x, offset=torch.zeros(1, 18, 5, 5), mask=torch.ones(1, 9, 5, 5),
                weight=torch.randn(3, 4, 3, 3), bias=torch.zeros(3), padding=1)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(input=torch.randn(4, 5, 5)), r"input must have shape \[N, Cin, H, W\]"),
        (dict(input=torch.randn(1, 4, 5, 5, dtype=torch.float64)), r"input must be float32, float16 or int8"),
        (dict(weight=torch.randn(3, 2, 3, 3)), r"weight must have shape \[Cout, 4, kh, kw\]"),
        (dict(weight=torch.randn(3, 4, 3, 3).half()), r"weight must have dtype"),
        (dict(offset=torch.zeros(1, 18, 4, 5)), r"offset must have shape \[1, 18, 5, 5\]"),
        (dict(offset=torch.zeros(1, 9, 5, 5)), r"offset must have shape \[1, 18, 5, 5\]"),
        (dict(offset=torch.zeros(1, 18, 5, 5, dtype=torch.float64)), r"offset must have dtype"),
        (dict(mask=torch.ones(1, 18, 5, 5)), r"mask must have shape \[1, 9, 5, 5\]"),
        (dict(bias=torch.zeros(4)), r"bias must have shape \[3\]"),
        (dict(groups=3), r"divisible by groups=3"),
        (dict(deform_groups=3), r"divisible by deform_groups=3"),
        (dict(stride=0), r"stride and dilation must be >= 1"),
        (dict(padding=-1), r"padding >= 0"),
        (dict(padding=0, input=torch.randn(1, 4, 2, 2)), r"too small"),
        (dict(variant="fp16"), r"variant 'fp16' takes input as torch.float16"),
        (dict(variant="bf16"), r"variant must be one of"),
        (dict(weight_scale=torch.ones(3)), r"weight_scale is only for variant 'int8'"),
        (dict(input=torch.zeros(1, 4, 5, 5, dtype=torch.int8), weight=torch.zeros(3, 4, 3, 3, dtype=torch.int8),
              weight_scale=torch.ones(3)), r"needs input_scale"),
        (dict(input=torch.zeros(1, 4, 5, 5, dtype=torch.int8), weight=torch.zeros(3, 4, 3, 3, dtype=torch.int8),
              input_scale=0.1), r"needs weight_scale"),
        (dict(input=torch.zeros(1, 4, 5, 5, dtype=torch.int8), weight=torch.zeros(3, 4, 3, 3, dtype=torch.int8),
              input_scale=0.1, weight_scale=torch.ones(4)), r"weight_scale must have shape \[3\]"),
        (dict(input=torch.zeros(1, 4, 5, 5, dtype=torch.int8), weight=torch.zeros(3, 4, 3, 3, dtype=torch.int8),
              input_scale=-1.0, weight_scale=torch.ones(3)), r"input_scale must be a positive"),
        (dict(offset=torch.zeros(1, 18, 5, 5, device="meta")), r"offset is on meta but input is on cpu"),
    ],
)
def test_input_checks(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        modulated_deform_conv2d(**args)


def test_module_checks():
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        ModulatedDeformConv2d(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match="in_channels must be divisible by deform_groups"):
        ModulatedDeformConv2dPack(6, 4, 3, deform_groups=4)


def _small_args(variant="fp32", requires_grad=False):
    x, off, m, wt, b, kw = _make((1, 4, 2, 4, 5, 1, 1, 1, 2, 2, True), "cpu", seed=5)
    s, p, d = (list(v) for v in mdc._pairs(kw["stride"], kw["padding"], kw["dilation"]))
    if variant == "int8":
        xq, s_x, wq, s_w = _int8_inputs(x, wt)
        return (xq, off, m, wq, b, s, p, d, 2, 2, "int8", s_x, s_w)
    for t in (x, off, m, wt, b):
        t.requires_grad_(requires_grad)
    return (x, off, m, wt, b, s, p, d, 2, 2, "fp32", 1.0, None)


@pytest.mark.parametrize(
    "variant,requires_grad,utils",
    [
        ("fp32", False, None),
        # tracing the reference backward under dynamic shapes (test_aot_dispatch_dynamic) takes ~20 s
        ("fp32", True, ("test_schema", "test_autograd_registration", "test_faketensor")),
        ("int8", False, None),
    ],
)
def test_opcheck(monkeypatch, variant, requires_grad, utils):
    monkeypatch.setattr(mdc, "use_triton", lambda t: False)  # the CPU reference path
    kwargs = {} if utils is None else dict(test_utils=utils)
    torch.library.opcheck(torch.ops.bevdeploy.modulated_deform_conv2d.default,
                          _small_args(variant, requires_grad=requires_grad), **kwargs)


def test_gradcheck_reference():
    x, off, m, wt, b, kw = _make((1, 2, 2, 4, 5, 1, 1, 1, 1, 2, True), "cpu", seed=6)
    off[:, 3::7] = 0.3  # keep every sample near the image (finite differences across the border are fine too)
    args = [t.double().requires_grad_(True) for t in (x, off, m, wt, b)]
    assert torch.autograd.gradcheck(lambda *a: reference(*a, **kw), args, fast_mode=True)


def test_op_backward_matches_reference(device):
    x, off, m, wt, b, s, p, d, g, dg, _, _, _ = _small_args()
    kw = dict(stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)
    leaves64 = [t.double().requires_grad_(True) for t in (x, off, m, wt, b)]
    grad_out = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    want = torch.autograd.grad(reference(*leaves64, **kw), leaves64, grad_out)
    leaves = [t.detach().to(device).requires_grad_(True) for t in (x, off, m, wt, b)]
    got = torch.autograd.grad(modulated_deform_conv2d(*leaves, **kw), leaves, grad_out.float().to(device))
    for name, gw, gg in zip(("input", "offset", "mask", "weight", "bias"), want, got):
        assert_rel_close(gg, gw, 1e-4, name=f"grad {name}")


class _Tiny(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x, offset, mask):
        return modulated_deform_conv2d(x, offset, mask, self.weight, None, 1, 1, 1, 1, 2)


def test_export_round_trip(device):
    x, off, m, wt, _, _ = _make((1, 4, 3, 4, 5, 1, 1, 1, 1, 2, False), device, seed=7)
    mod = _Tiny(wt).to(device)
    with torch.no_grad():
        eager = mod(x, off, m)
        ep = torch.export.export(mod, (x, off, m))
        nodes = [n for n in ep.graph.nodes
                 if n.op == "call_function" and "bevdeploy.modulated_deform_conv2d" in str(n.target)]
        assert len(nodes) == 1
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        torch.testing.assert_close(loaded.module()(x, off, m), eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
def test_gpu_stage_like_shape(variant):
    # a ResNet-DCN-like layer (channels-last, 3x3, 128 -> 128) through the tuned launch path
    case = (2, 128, 128, 24, 40, 1, 1, 1, 1, 1, True)
    x, off, m, wt, b, kw = _make(case, "cuda", seed=8)
    x = x.contiguous(memory_format=torch.channels_last)
    if variant == "int8":
        xq, s_x, wq, s_w = _int8_inputs(x, wt)
        ref = _ref64(xq.double() * s_x, off, m, wq.double() * s_w.double()[:, None, None, None], b, kw)
        y = modulated_deform_conv2d(xq, off, m, wq, b, **kw, input_scale=s_x, weight_scale=s_w)
        assert_int8_close(y, ref, _int8_bound(s_x, wq, s_w, ref, 0.75))
    else:
        dt = torch.float32 if variant == "fp32" else torch.float16
        x, wt = x.to(dt), wt.to(dt).contiguous(memory_format=torch.channels_last)
        y = modulated_deform_conv2d(x, off, m, wt, b, **kw, variant=variant)
        assert_rel_close(y, _ref64(x, off, m, wt, b, kw), REL_TOL[variant])
