"""FP8 (e4m3) kernels on the CPU: quantization against ``torch.float8_e4m3fn`` casts, the Triton GEMM /
implicit-GEMM conv through Triton's interpreter (its fp8 ``tl.dot`` is exact) and the ``_scaled_mm``
path (CPU ``_scaled_mm`` exists in recent torch) against the plain-PyTorch references, the ops'
registration (opcheck, export keeps one node), and the argument checks.

The GEMM tests quantize with torch's cast (the interpreter's own fp32 -> e4m3 conversion is wrong
at binade edges; the Triton quantize kernel is tested on the GPU, tests/quant/test_fp8_gpu.py).
"""

import pytest
import torch

from bevdeploy.quant import fp8_kernels as fk
from bevdeploy.quant.fp8_kernels import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_conv2d,
    fp8_linear,
    quantize_fp8,
    quantize_weight_fp8,
    reference_fp8_conv2d,
    reference_fp8_linear,
    reference_quantize_fp8,
)
from bevdeploy.ops._utils import interpreter_enabled
from tests._utils import assert_rel_close, poisoned

#: The Triton tests here run CPU tensors through the interpreter (on a GPU machine: test_fp8_gpu.py).
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="Triton's interpreter is off")

#: Relative L2 error of a kernel against the reference on the same codes: both sum exact fp32
#: products in fp32 (only the order differs); fp16 outputs add their rounding.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _codes(shape, scale, gen, memory_format=torch.contiguous_format):
    x = torch.randn(shape, generator=gen) * 3
    return reference_quantize_fp8(x, scale).contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------- quantize


def test_quantize_matches_torch_cast_saturates_and_keeps_nan():
    g = torch.Generator().manual_seed(0)
    scale = 0.037
    x = torch.randn(4099, generator=g) * 5
    x[:6] = torch.tensor([1e6, -1e6, float("inf"), -float("inf"), FP8_MAX * scale * 1.01, 1e-12])
    x[6] = float("nan")
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    want = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    same = (q.float() == want.float()) | (q.float().isnan() & want.float().isnan())
    assert same.all()
    assert q[:5].float().tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]  # saturation, never NaN
    assert q[6].float().isnan()  # NaN never becomes a finite code
    assert torch.isfinite(q[7:].float()).all()
    # round trip within e4m3's half-ulp (2^-4 relative) for in-range normal values
    back = q[7:].float() * scale
    ok = ((x[7:] / scale).abs() > 2**-6) & ((x[7:] / scale).abs() <= FP8_MAX)
    assert ((back - x[7:]).abs()[ok] <= x[7:].abs()[ok] * 2**-4 + 1e-12).all()


def test_quantize_keeps_channels_last_and_half_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 7, generator=g).half().contiguous(memory_format=torch.channels_last)
    q = quantize_fp8(x, 0.01)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q.float(), (x.float() / 0.01).clamp(-448, 448).to(FP8_DTYPE).float())


def test_quantize_weight_per_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 3, 3, 3, generator=g) * torch.tensor([1e-3, 1, 10, 100, 0, 0.5]).view(-1, 1, 1, 1)
    q, s = quantize_weight_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (6,)
    assert s[4] == 1.0 and (q[4].float() == 0).all()  # an all-zero channel
    amax = q.float().abs().reshape(6, -1).amax(dim=1)
    assert (amax[[0, 1, 2, 3, 5]] == 448).all()  # each channel's largest |w| maps to 448 exactly
    deq = q.float() * s.view(-1, 1, 1, 1)
    err = (deq - w).abs() / w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
    assert torch.isfinite(deq).all() and err.max() <= 2**-4 + 1e-7
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight_fp8(torch.tensor([[float("nan")]]))


# ---------------------------------------------------------------------------------------- GEMMs


@needs_interpreter
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mkn,act,bias,res", [((37, 45, 19), "none", False, False), ((70, 64, 48), "relu", True, True),
                                              ((5, 96, 33), "silu", True, False)])
def test_triton_linear_matches_reference(mkn, act, bias, res, out_dtype):
    m, k, n = mkn
    g = torch.Generator().manual_seed(m + k + n)
    x_q = _codes((m, k), 0.02, g)
    w_q, w_s = quantize_weight_fp8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(m, n, generator=g).to(out_dtype) if res else None
    name = fk._DTYPE_NAME[out_dtype]
    ref = reference_fp8_linear(x_q, w_q, 0.02, w_s, b, r, act, name)
    out = poisoned((m, n), out_dtype, "cpu")
    fk._fp8_linear_cuda_or_triton(x_q, w_q, 0.02, w_s, b, r, act, name, out=out, backend="triton")
    assert_rel_close(out, ref, TOL[out_dtype])


@needs_interpreter
@pytest.mark.parametrize("geom", [
    dict(k=3, stride=1, padding=1, dilation=1, c=13, o=11, hw=(7, 9)),
    dict(k=3, stride=2, padding=1, dilation=1, c=32, o=40, hw=(9, 8)),
    dict(k=3, stride=1, padding=2, dilation=2, c=5, o=7, hw=(6, 6)),
    dict(k=1, stride=1, padding=0, dilation=1, c=24, o=17, hw=(5, 7)),  # the GEMM path
])
def test_triton_conv_matches_reference(geom):
    g = torch.Generator().manual_seed(geom["c"] * geom["o"])
    n, (h, w) = 2, geom["hw"]
    x_q = _codes((n, geom["c"], h, w), 0.05, g, torch.channels_last)
    w_q, w_s = quantize_weight_fp8(torch.randn(geom["o"], geom["c"], geom["k"], geom["k"], generator=g))
    w_q = w_q.permute(0, 2, 3, 1).contiguous()
    b = torch.randn(geom["o"], generator=g)
    args = ([geom["stride"]] * 2, [geom["padding"]] * 2, [geom["dilation"]] * 2, 1)
    plain = reference_fp8_conv2d(x_q, w_q, 0.05, w_s, b, *args, None, "none", "float32")
    res = torch.randn(plain.shape, generator=g).contiguous(memory_format=torch.channels_last)
    ref = reference_fp8_conv2d(x_q, w_q, 0.05, w_s, b, *args, res, "relu", "float32")
    out = poisoned(ref.shape, torch.float32, "cpu").contiguous(memory_format=torch.channels_last)
    fk._fp8_conv2d_cuda_or_triton(x_q, w_q, 0.05, w_s, b, *args, res, "relu", "float32", out=out, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, ref, TOL[torch.float32])
    # an NCHW input is relaid out, same result
    out2 = fk._fp8_conv2d_cuda_or_triton(x_q.contiguous(), w_q, 0.05, w_s, b, *args, res, "relu", "float32")
    assert_rel_close(out2, ref, TOL[torch.float32])


def _cpu_scaled_mm_works() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=FP8_DTYPE)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("act,bias,res,out_dtype", [("none", False, False, torch.float16),
                                                    ("relu", True, True, torch.float32),
                                                    ("silu", True, False, torch.float16)])
def test_scaled_mm_path_matches_reference(act, bias, res, out_dtype):
    """The epilogue around ``torch._scaled_mm`` (row-wise scales, bias / residual / activation after)."""
    m, k, n = 40, 64, 48
    g = torch.Generator().manual_seed(7)
    x_q = _codes((m, k), 0.03, g)
    w_q, w_s = quantize_weight_fp8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(m, n, generator=g) if res else None
    name = fk._DTYPE_NAME[out_dtype]
    ref = reference_fp8_linear(x_q, w_q, 0.03, w_s, b, r, act, name)
    out = poisoned((m, n), out_dtype, "cpu")
    fk._scaled_mm_gemm(x_q, w_q, 0.03, w_s, b, r, act, out)
    assert_rel_close(out, ref, TOL[out_dtype])
    assert fk.scaled_mm_eligible(m, n, k, x_q, w_q) is False  # CPU tensors never take it in the ops


# ---------------------------------------------------------------------------------------- ops


def _linear_args(g):
    x_q = _codes((3, 5, 32), 0.1, g)
    w_q, w_s = quantize_weight_fp8(torch.randn(16, 32, generator=g))
    return x_q, w_q, 0.1, w_s, torch.randn(16, generator=g), None, "relu", "float16"


def _conv_args(g):
    x_q = _codes((1, 8, 5, 6), 0.1, g, torch.channels_last)
    w_q, w_s = quantize_weight_fp8(torch.randn(4, 8, 3, 3, generator=g))
    return (x_q, w_q.permute(0, 2, 3, 1).contiguous(), 0.1, w_s, None, [1, 1], [1, 1], [1, 1], 1, None, "none",
            "float32")


def test_opcheck(ops_on_references):
    g = torch.Generator().manual_seed(3)
    # opcheck's test_schema compares inputs with arithmetic that torch lacks for float8 tensors, so the
    # GEMM ops skip it (their schema declares no mutation; quantize_fp8, with a float input, runs it)
    tests = ("test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.bevdeploy.fp8_linear.default, _linear_args(g), test_utils=tests)
    torch.library.opcheck(torch.ops.bevdeploy.fp8_conv2d.default, _conv_args(g), test_utils=tests)
    torch.library.opcheck(torch.ops.bevdeploy.quantize_fp8.default, (torch.randn(4, 6, generator=g), 0.5),
                          test_utils=("test_schema", *tests))


def test_public_functions_equal_references_and_export_keeps_one_node(ops_on_references):
    g = torch.Generator().manual_seed(4)
    x_q, w_q, xs, w_s, b, _, act, _ = _linear_args(g)
    torch.testing.assert_close(fp8_linear(x_q, w_q, xs, w_s, b, activation=act),
                               reference_fp8_linear(x_q, w_q, xs, w_s, b, None, act, "float16"), rtol=0, atol=0)
    cx, cw, cs, cws, _, *_ = _conv_args(g)
    torch.testing.assert_close(fp8_conv2d(cx, cw, cs, cws, padding=1, out_dtype=torch.float32),
                               reference_fp8_conv2d(cx, cw, cs, cws, None, (1, 1), (1, 1), (1, 1), 1, None, "none",
                                                    "float32"), rtol=0, atol=0)

    class M(torch.nn.Module):
        def forward(self, x):
            return fp8_linear(quantize_fp8(x, xs), w_q, xs, w_s, b, activation=act)

    ep = torch.export.export(M(), (torch.randn(3, 5, 32, generator=g),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("bevdeploy.fp8_linear.default") == 1
    assert targets.count("bevdeploy.quantize_fp8.default") == 1


def test_argument_checks():
    g = torch.Generator().manual_seed(5)
    x_q, w_q, xs, w_s, b, *_ = _linear_args(g)
    with pytest.raises(ValueError, match="x_q must have dtype"):
        fp8_linear(x_q.float(), w_q, xs, w_s)
    with pytest.raises(ValueError, match="w_q: K"):
        fp8_linear(x_q, w_q[:, :16], xs, w_s)
    with pytest.raises(TypeError, match="x_scale must be a python float"):
        fp8_linear(x_q, w_q, torch.tensor(0.1), w_s)
    with pytest.raises(ValueError, match="x_scale must be a positive finite"):
        fp8_linear(x_q, w_q, float("nan"), w_s)
    with pytest.raises(ValueError, match="activation must be one of"):
        fp8_linear(x_q, w_q, xs, w_s, activation="gelu")
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        fp8_linear(x_q, w_q, xs, w_s, residual=torch.zeros(3, 5, 15))
    with pytest.raises(ValueError, match="out_dtype must be"):
        fp8_linear(x_q, w_q, xs, w_s, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        quantize_fp8(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="x must have dtype"):
        quantize_fp8(torch.zeros(3, dtype=torch.int32), 1.0)
    cx, cw, cs, cws, *_ = _conv_args(g)
    with pytest.raises(NotImplementedError, match="groups=1"):
        fp8_conv2d(cx, cw, cs, cws, groups=2)
    with pytest.raises(ValueError, match="w_q: C"):
        fp8_conv2d(cx, cw[..., :4], cs, cws)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        fp8_conv2d(cx[:, :, :1, :1], cw, cs, cws)
