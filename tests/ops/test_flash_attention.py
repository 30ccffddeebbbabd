import io

import pytest
import torch

from bevdeploy.ops._utils import interpreter_enabled, quantize_int8
from bevdeploy.ops.flash_attention import FlashAttention, _flash_attention_triton, flash_attention, reference
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned, rel_error

OP = torch.ops.bevdeploy.flash_attention.default
FLOAT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16}
# (B, H, Lq, Lk, D): odd sizes, a single query, D not a power of two, Lk a multiple of every
# interpreter BLOCK_N (no tail tile), D = 128 (the limit)
SHAPES = [(2, 3, 37, 19, 8), (1, 2, 1, 65, 5), (1, 1, 18, 33, 33), (2, 1, 16, 64, 16), (1, 1, 5, 7, 128)]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def kernel_device(device):
    """``device`` for tests that call the Triton launcher directly: CPU needs the interpreter."""
    if device.type == "cpu" and not interpreter_enabled():
        pytest.skip("CPU without TRITON_INTERPRET: no Triton kernels to test")
    return device


def _qkv(shape, device, magnitude=1.0, dtype=torch.float32):
    b, h, lq, lk, d = shape
    q = torch.randn(b, h, lq, d, device=device) * magnitude
    k = torch.randn(b, h, lk, d, device=device) * magnitude
    v = torch.randn(b, h, lk, d, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run_float(variant, q, k, v, scale=None, config=None):
    """Kernel output (into a NaN-poisoned buffer) and the float64 reference on the same inputs."""
    b, h, lq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = poisoned((b, h, lq, d), torch.float32 if variant == "fp32" else torch.float16, q.device)
    _flash_attention_triton(q, k, v, scale, variant, out=out, config=config)
    return out, reference(q.double(), k.double(), v.double(), scale)


def _quantize(x):
    scale = x.abs().amax().item() / 127
    return quantize_int8(x, scale), scale


def _int8_bound(qd, kd, vd, ref, scale):
    """Worst-case error of the int8 kernel against the float reference on the dequantised inputs.

    Per query row, with p_j = exp(s_j - max s) and L = sum_j p_j (exact, float64): the kernel
    quantises p (relative to the running max, later rescaled by factors <= 1) to round(127 p)/127,
    an error <= min(p_j, 1/254) per key, plus fp32 logit error eta * p_j (eta ~ 2^-22 |s|), so
    ||P^ - P||_1 <= E = sum_j min(p_j, 1/254) + 2 eta L. It divides by the quantised sum
    L^ >= max(1, L - E) (the row max's own entry is exactly 127/127). For w = P / L, w^ = P^ / L^:
    ||w^ - w||_1 <= 2 E / L^, and as sum(w^ - w) = 0 the output moves by <= ||w^ - w||_1 times
    half the range of each value column. Plus fp16 output rounding.
    """
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    row_sum = p.sum(-1, keepdim=True)
    eta = 1e-6 + 4e-7 * s.abs().amax(-1, keepdim=True)
    err_p = torch.clamp(p, max=1 / 254).sum(-1, keepdim=True) + 2 * eta * row_sum
    l_hat = torch.clamp(row_sum - err_p, min=1.0)
    half_range = (vd.amax(2, keepdim=True) - vd.amin(2, keepdim=True)) / 2  # (B, H, 1, D)
    bound = 2 * err_p / l_hat * half_range
    return (bound.amax() + ref.abs().amax() * 2.0**-10 + 1e-6).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2"])
def test_triton_matches_reference(kernel_device, variant, shape):
    q, k, v = _qkv(shape, kernel_device, dtype=FLOAT_DTYPE[variant])
    out, ref = _run_float(variant, q, k, v)
    assert_rel_close(out, ref, REL_TOL[variant])


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_int8_within_derived_bound(kernel_device, shape):
    qf, kf, vf = _qkv(shape, kernel_device)
    (q, qs), (k, ks), (v, vs) = _quantize(qf), _quantize(kf), _quantize(vf)
    qd, kd, vd = q.double() * qs, k.double() * ks, v.double() * vs
    scale = shape[-1] ** -0.5
    ref = reference(qd, kd, vd, scale)
    out = poisoned(ref.shape, torch.float16, kernel_device)
    _flash_attention_triton(q, k, v, scale, "int8", qs, ks, vs, out=out)
    assert_int8_close(out, ref, _int8_bound(qd, kd, vd, ref, scale))
    # P's 1/127 step against diffuse random attention gives ~1e-2 relative L2 (worst of 60 draws:
    # 1.4e-2); floor 3e-2. A single query row averages too few errors for a stable ratio.
    if shape[0] * shape[1] * shape[2] >= 16:
        assert rel_error(out, ref) < 3e-2


@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
def test_large_logits_are_stable(kernel_device, variant):
    # logits in the thousands: exp without max subtraction overflows
    shape = (1, 2, 17, 40, 16)
    if variant == "int8":
        qf, kf, vf = _qkv(shape, kernel_device, magnitude=30.0)
        (q, qs), (k, ks), (v, vs) = _quantize(qf), _quantize(kf), _quantize(vf)
        qd, kd, vd = q.double() * qs, k.double() * ks, v.double() * vs
        ref = reference(qd, kd, vd, 0.25)
        assert torch.matmul(qd, kd.transpose(-1, -2)).abs().amax() * 0.25 > 1000
        out = _flash_attention_triton(q, k, v, 0.25, "int8", qs, ks, vs)
        assert_int8_close(out, ref, _int8_bound(qd, kd, vd, ref, 0.25))
        return
    q, k, v = _qkv(shape, kernel_device, magnitude=30.0, dtype=FLOAT_DTYPE[variant])
    out, ref = _run_float(variant, q, k, v, scale=0.25)
    assert torch.matmul(q.double(), k.double().transpose(-1, -2)).abs().amax() * 0.25 > 1000
    assert_rel_close(out, ref, REL_TOL[variant])


def test_fp16x2_accumulator_does_not_overflow(kernel_device):
    # uniform attention over 100 keys of |v| ~ 2000: an un-normalised fp16 sum would reach 2e5
    q = torch.zeros(1, 1, 9, 16, device=kernel_device, dtype=torch.float16)
    k = torch.randn(1, 1, 100, 16, device=kernel_device).half()
    v = (2000 + 10 * torch.randn(1, 1, 100, 16, device=kernel_device)).half()
    out, ref = _run_float("fp16x2", q, k, v)
    assert_rel_close(out, ref, REL_TOL["fp16x2"])


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_non_contiguous_inputs(kernel_device, variant):
    b, h, lq, lk, d = 2, 3, 11, 21, 16
    dtype = torch.float32 if variant == "fp32" else torch.float16
    # q, v: [B, L, H, D] viewed as [B, H, L, D]; k: [B, H, D, L] viewed (stride 1 on L, not D)
    q = torch.randn(b, lq, h, d, device=kernel_device).transpose(1, 2)
    k = torch.randn(b, h, d, lk, device=kernel_device).transpose(2, 3)
    v = torch.randn(b, lk, h, d, device=kernel_device).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    if variant == "int8":
        (q8, qs), (k8, ks), (v8, vs) = _quantize(q), _quantize(k), _quantize(v)  # keeps the strides
        assert not (q8.is_contiguous() or k8.is_contiguous() or v8.is_contiguous())
        qd, kd, vd = q8.double() * qs, k8.double() * ks, v8.double() * vs
        ref = reference(qd, kd, vd, d**-0.5)
        out = flash_attention(q8, k8, v8, q_scale=qs, k_scale=ks, v_scale=vs)
        assert_int8_close(out, ref, _int8_bound(qd, kd, vd, ref, d**-0.5))
        return
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, ref = _run_float(variant, q, k, v)
    assert_rel_close(out, ref, REL_TOL[variant])


def test_config_override_and_public_function(kernel_device):
    # a larger block than the interpreter's default, a non-default scale, the module
    q, k, v = _qkv((1, 2, 40, 50, 24), kernel_device)
    out, ref = _run_float("fp32", q, k, v, scale=0.3, config=(32, 32, 4, 2))
    assert_rel_close(out, ref, REL_TOL["fp32"])
    assert_rel_close(flash_attention(q, k, v, scale=0.3), ref, REL_TOL["fp32"])
    assert_rel_close(FlashAttention()(q, k, v), reference(q.double(), k.double(), v.double()), REL_TOL["fp32"])
    qh, kh, vh = q.half(), k.half(), v.half()
    ref16 = reference(qh.double(), kh.double(), vh.double())
    out16 = flash_attention(qh, kh, vh, variant="fp16x2")
    assert out16.dtype == torch.float16
    assert_rel_close(out16, ref16, REL_TOL["fp16x2"])


def test_gradients():
    q, k, v = (x.double().requires_grad_(True) for x in _qkv((1, 2, 5, 6, 3), "cpu"))
    assert torch.autograd.gradcheck(lambda q, k, v: reference(q, k, v, 0.7), (q, k, v))
    g = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    ref_grads = torch.autograd.grad(reference(q, k, v, 0.7), (q, k, v), g)
    x32 = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    grads = torch.autograd.grad(flash_attention(*x32, scale=0.7), x32, g.float())
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(got, want, 1e-5, name=f"grad {name}")


def _bad_inputs():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    return [
        ((q[0], k, v), {}, r"q must have shape \[B, H, Lq, D\]"),
        ((q, k[0], v), {}, r"k must have shape \[B, H, Lk, D\]"),
        ((q.double(), k.double(), v.double()), {}, r"q must be float32, float16 or int8"),
        ((q, k.half(), v), {}, r"k must have the dtype of q"),
        ((q, k, v.to("meta")), {}, r"v is on meta"),
        ((q, k, v[:, :, :6]), {}, r"v: the number of keys Lk"),
        ((q, k[..., :7], v), {}, r"k: the head dim D"),
        ((q, k, v[..., :7]), {}, r"v: the head dim D"),
        ((q, k[:, :1], v), {}, r"k: the number of heads H"),
        ((q, k.expand(2, -1, -1, -1), v), {}, r"k: the batch size B"),
        ((q, k[:, :, :0], v[:, :, :0]), {}, r"Lk >= 1"),
        ((torch.randn(1, 1, 2, 129),) * 3, {}, r"head dim D must be in \[1, 128\]"),
        ((q, k, v), {"variant": "fp16x2"}, r"variant 'fp16x2' takes q as torch.float16"),
        ((q, k, v), {"variant": "bf16"}, r"variant must be one of"),
        ((q, k, v), {"scale": 0.0}, r"scale must be a positive finite float"),
        ((q.to(torch.int8), k.to(torch.int8), v.to(torch.int8)), {"q_scale": 0.1, "k_scale": 0.1}, r"needs v_scale"),
    ]


@pytest.mark.parametrize("args,kwargs,match", _bad_inputs())
def test_input_checks(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args, **kwargs)


def test_opcheck():
    q, k, v = _qkv((1, 2, 3, 5, 4), "cpu")
    args = [x.requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(OP, (*args, 0.5, "fp32", 1.0, 1.0, 1.0))
    (q8, qs), (k8, ks), (v8, vs) = (_quantize(x.detach()) for x in (q, k, v))
    torch.library.opcheck(OP, (q8, k8, v8, 0.5, "int8", qs, ks, vs))


def test_export_round_trip():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = FlashAttention(scale=0.4)

        def forward(self, x):  # x (B, L, H, D)
            q = x.transpose(1, 2)
            return self.attn(q, q * 0.5, q).transpose(1, 2)

    x = torch.randn(1, 6, 2, 8)
    ep = torch.export.export(Tiny(), (x,))
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert torch.equal(loaded.module()(x), Tiny()(x))


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
@pytest.mark.parametrize(
    "shape,config",
    [
        ((1, 8, 900, 900, 32), None),  # BEVFormer decoder self-attention, heuristic config
        ((2, 2, 300, 700, 64), (128, 128, 8, 3)),  # the large-shape tile, full + tail key tiles
        ((1, 2, 200, 333, 128), (128, 64, 8, 3)),
    ],
)
def test_gpu_shapes(variant, shape, config):
    if variant == "fp32":
        config = None  # the forced tiles are fp16/int8 tiles; 3xTF32 operands need fp32's own (smaller) tiles
    if variant == "int8":
        qf, kf, vf = _qkv(shape, "cuda")
        (q, qs), (k, ks), (v, vs) = _quantize(qf), _quantize(kf), _quantize(vf)
        qd, kd, vd = q.double() * qs, k.double() * ks, v.double() * vs
        scale = shape[-1] ** -0.5
        ref = reference(qd, kd, vd, scale)
        out = _flash_attention_triton(q, k, v, scale, "int8", qs, ks, vs, config=config)
        assert_int8_close(out, ref, _int8_bound(qd, kd, vd, ref, scale))
        return
    q, k, v = _qkv(shape, "cuda", dtype=FLOAT_DTYPE[variant])
    out, ref = _run_float(variant, q, k, v, config=config)
    assert_rel_close(out, ref, REL_TOL[variant])
