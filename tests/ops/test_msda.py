import io

import pytest
import torch

from bevdeploy.ops import msda as msda_module  # the module
from bevdeploy.ops._utils import dequantize_int8, quantize_int8
from bevdeploy.ops.msda import (
    MSDA,
    MSDAFused,
    _msda_cpu,
    _msda_fused_triton,
    _msda_triton,
    fused_to_classic,
    msda,
    msda_fused,
    reference,
    reference_fused,
)
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

# Two odd levels; the Triton interpreter is slow, so every kernel call stays tiny.
SHAPES = [(5, 7), (3, 4)]
S = sum(h * w for h, w in SHAPES)
B, Q, H, P, R = 2, 7, 3, 4, 2
L = len(SHAPES)


def _classic(device, D, small=torch.float32, seed=0, b=B, h=H):
    """value (fp32), locations in [-0.15, 1.15] (some corners fall outside: zero padding), weights."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(b, S, h, D, generator=g)
    loc = torch.rand(b, Q, h, L, P, 2, generator=g) * 1.3 - 0.15
    weights = torch.softmax(torch.randn(b, Q, h, L * P, generator=g), -1).view(b, Q, h, L, P)
    return value.to(device), loc.to(device, small), weights.to(device, small)


def _fused(device, D, small=torch.float32, seed=0, b=B, h=H):
    """value (fp32), reference points in [0, 1], pixel offsets reaching past the map, logits."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(b, S, h, D, generator=g)
    ref = torch.rand(b, Q, R, 2, generator=g)
    offsets = torch.randn(b, Q, h, L, P, 2, generator=g) * 2.0
    logits = torch.randn(b, Q, h, L * P, generator=g) * 2.0
    return value.to(device), ref.to(device, small), offsets.to(device, small), logits.to(device, small)


def _store(value, variant):
    """The value tensor the variant takes, its scale, and the float64 values the kernel really sees."""
    if variant == "int8":
        scale = value.abs().max().item() / 127
        q = quantize_int8(value, scale)
        return q, scale, dequantize_int8(q, scale).double()
    stored = value.half() if variant in ("fp16", "fp16x2") else value
    return stored, None, stored.double()


def _int8_bound(scale):
    # out = scale * sum(w * q) with convex weights, so |out| <= 127 * scale; the only errors are
    # the fp16 output rounding (2**-11 relative) and fp32 accumulation (a few 2**-24, rounded up).
    return 127 * scale * (2**-11 + 2**-16)


# (variant, head dim, dtype of the small tensors): odd D (masked channels) and even D, fp16 small tensors
CASES = [
    ("fp32", 5, torch.float32),
    ("fp16", 8, torch.float16),
    ("fp16x2", 5, torch.float32),
    ("int8", 8, torch.float16),
]


@pytest.mark.parametrize("variant,D,small", CASES)
def test_msda_triton_matches_reference(device, variant, D, small):
    value, loc, weights = _classic(device, D, small)
    stored, scale, value64 = _store(value, variant)
    out = poisoned((B, Q, H * D), torch.float32 if variant == "fp32" else torch.float16, device)
    _msda_triton(stored, SHAPES, loc, weights, variant, 1.0 if scale is None else scale, out=out)
    expected = reference(value64, SHAPES, loc.double(), weights.double())
    if variant == "int8":
        assert_int8_close(out, expected, _int8_bound(scale))
    else:
        assert_rel_close(out, expected, REL_TOL[variant])


@pytest.mark.parametrize("variant,D,small", CASES)
def test_msda_fused_triton_matches_reference(device, variant, D, small):
    value, ref, offsets, logits = _fused(device, D, small)
    stored, scale, value64 = _store(value, variant)
    out = poisoned((B, Q, H * D), torch.float32 if variant == "fp32" else torch.float16, device)
    _msda_fused_triton(stored, SHAPES, ref, offsets, logits, variant, 1.0 if scale is None else scale, out=out)
    expected = reference_fused(value64, SHAPES, ref.double(), offsets.double(), logits.double())
    if variant == "int8":
        assert_int8_close(out, expected, _int8_bound(scale))
        # against the unquantized value: each sample moves by at most scale / 2
        float_expected = reference_fused(value.double(), SHAPES, ref.double(), offsets.double(), logits.double())
        assert_int8_close(out, float_expected, scale / 2 + _int8_bound(scale))
    else:
        assert_rel_close(out, expected, REL_TOL[variant])


@pytest.mark.parametrize("variant", ["fp32", "fp16x2"])
def test_edge_shapes(device, variant):
    # 4 levels with sides of 1 (constexpr 1 on the GPU), P=3 (a padded point row), R=3, Q=1, D=3
    shapes = [(1, 5), (4, 1), (2, 3), (1, 1)]
    g = torch.Generator().manual_seed(5)
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3, generator=g).to(device)
    ref = torch.rand(2, 1, 3, 2, generator=g).to(device)
    offsets = (torch.randn(2, 1, 2, 4, 3, 2, generator=g) * 1.5).to(device)
    logits = torch.randn(2, 1, 2, 12, generator=g).to(device)
    stored, _, value64 = _store(value, variant)
    expected = reference_fused(value64, shapes, ref.double(), offsets.double(), logits.double())
    assert_rel_close(msda_fused(stored, shapes, ref, offsets, logits, variant=variant), expected, REL_TOL[variant])
    loc, weights = fused_to_classic(shapes, ref, offsets, logits)
    assert_rel_close(msda(stored, shapes, loc, weights, variant=variant), expected, REL_TOL[variant])


def test_zero_padding_outside_the_map(device):
    # every point at least one pixel outside its level: all corners are padding
    value, loc, weights = _classic(device, 4, b=1, h=1)
    loc = torch.where(loc < 0.5, -0.5, 1.5).to(loc)
    out = msda(value, SHAPES, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))


def test_msda_fused_equals_msda_on_equivalent_inputs(device):
    value, ref, offsets, logits = _fused(device, 5, seed=1, b=1)
    loc, weights = fused_to_classic(SHAPES, ref, offsets, logits)
    assert_rel_close(msda_fused(value, SHAPES, ref, offsets, logits), msda(value, SHAPES, loc, weights), REL_TOL["fp32"])


def test_non_contiguous_inputs(device):
    value, loc, weights = _classic(device, 6, b=1, h=2)
    # channels with a stride (the launcher copies), locations and weights as permuted views
    value_nc = torch.stack([value, value], -1)[..., 0]
    loc_nc = loc.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    weights_nc = weights.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    expected = reference(value.double(), SHAPES, loc.double(), weights.double())
    assert_rel_close(msda(value_nc, SHAPES, loc_nc, weights_nc), expected, REL_TOL["fp32"])

    value, ref, offsets, logits = _fused(device, 6, b=1, h=2)
    ref_nc = torch.stack([ref, ref], -1)[..., 0]
    logits_nc = torch.cat([logits, logits], -1)[..., : L * P]
    assert not (ref_nc.is_contiguous() or logits_nc.is_contiguous())
    expected = reference_fused(value.double(), SHAPES, ref.double(), offsets.double(), logits.double())
    assert_rel_close(msda_fused(value, SHAPES, ref_nc, offsets, logits_nc), expected, REL_TOL["fp32"])


def test_public_functions_and_modules(device):
    value, loc, weights = _classic(device, 4, b=1)
    shapes_tensor = torch.tensor(SHAPES)  # an int tensor on the CPU is accepted too
    out = MSDA(variant="fp16x2")(value.half(), shapes_tensor, loc, weights)
    assert out.dtype == torch.float16 and out.shape == (1, Q, H * 4)
    assert_rel_close(out, reference(value.half().double(), SHAPES, loc.double(), weights.double()), REL_TOL["fp16x2"])

    value, ref, offsets, logits = _fused(device, 4, b=1)
    stored, scale, value64 = _store(value, "int8")
    module = MSDAFused(variant="int8", value_scale=scale)
    assert "int8" in repr(module)
    out = module(stored, SHAPES, ref, offsets, logits)
    assert out.dtype == torch.float16
    expected = reference_fused(value64, SHAPES, ref.double(), offsets.double(), logits.double())
    assert_int8_close(out, expected, _int8_bound(scale))


def test_empty_query_set(device):
    value, loc, weights = _classic(device, 4)
    assert msda(value, SHAPES, loc[:, :0], weights[:, :0]).shape == (B, 0, H * 4)


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_cpu_reference_path(variant):
    # what the op runs on CPU tensors without the interpreter (and differentiates for autograd)
    value, loc, weights = _classic("cpu", 5)
    stored, scale, value64 = _store(value, variant)
    out = _msda_cpu(stored, [v for hw in SHAPES for v in hw], loc, weights, variant, 1.0 if scale is None else scale)
    assert out.dtype == torch.float16
    assert_rel_close(out, reference(value64, SHAPES, loc.double(), weights.double()), REL_TOL["fp16"])


def _tiny_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (2, 3)]
    value = torch.randn(1, 18, 1, 3, generator=g)
    loc = torch.rand(1, 3, 1, 2, 2, 2, generator=g) * 1.2 - 0.1
    weights = torch.softmax(torch.randn(1, 3, 1, 4, generator=g), -1).view(1, 3, 1, 2, 2)
    ref = torch.rand(1, 3, 2, 2, generator=g)
    offsets = torch.randn(1, 3, 1, 2, 2, 2, generator=g)
    logits = torch.randn(1, 3, 1, 4, generator=g)
    return shapes, *(t.to(dtype) for t in (value, loc, weights, ref, offsets, logits))


def test_gradcheck_reference():
    shapes, value, loc, weights, ref, offsets, logits = _tiny_inputs(torch.float64)
    inputs = [t.requires_grad_(True) for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, lo, w: reference(v, shapes, lo, w), inputs)
    inputs = [t.requires_grad_(True) for t in (value, ref, offsets, logits)]
    assert torch.autograd.gradcheck(lambda v, r, o, lg: reference_fused(v, shapes, r, o, lg), inputs)


def test_op_gradients_match_reference():
    # the ops' backward is the reference's autograd: fp32 op gradients against float64 ones
    shapes, value, loc, weights, ref, offsets, logits = _tiny_inputs(torch.float64)
    grad = torch.randn(1, 3, 3, dtype=torch.float64)
    cases = [
        (msda, reference, (value, loc, weights)),
        (msda_fused, reference_fused, (value, ref, offsets, logits)),
    ]
    for fn, ref_fn, tensors in cases:
        inputs64 = [t.detach().requires_grad_(True) for t in tensors]
        expected = torch.autograd.grad(ref_fn(inputs64[0], shapes, *inputs64[1:]), inputs64, grad)
        inputs = [t.detach().float().requires_grad_(True) for t in tensors]
        got = torch.autograd.grad(fn(inputs[0], shapes, *inputs[1:]), inputs, grad.float())
        for g, e in zip(got, expected):
            assert_rel_close(g, e, 1e-4)


def _bad_classic():
    value, loc, weights = _classic("cpu", 4)
    return dict(value=value, spatial_shapes=SHAPES, sampling_locations=loc, attention_weights=weights)


def _bad_fused():
    value, ref, offsets, logits = _fused("cpu", 4)
    return dict(value=value, spatial_shapes=SHAPES, reference_points=ref, sampling_offsets=offsets, attention_logits=logits)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(value=torch.randn(B, S, H * 4)), r"value must have shape \[B, S, H, D\]"),
        (dict(value=torch.randn(B, S, H, 4, dtype=torch.float64)), r"value must be float32, float16 or int8"),
        (dict(value=torch.randn(B, S + 1, H, 4)), r"S = sum\(h\*w\) over spatial_shapes = 47, got S=48"),
        (dict(variant="fp16"), r"variant 'fp16' takes value as torch.float16"),
        (dict(variant="bf16"), r"variant must be one of"),
        (dict(spatial_shapes=[(5, 7, 1), (3, 4)]), r"\(h, w\) pairs"),
        (dict(spatial_shapes=[(5, 7), (3, 0)]), r"positive"),
        (dict(spatial_shapes=torch.tensor([[5.0, 7.0], [3.0, 4.0]])), r"int tensor of shape \[L, 2\]"),
        (dict(spatial_shapes=[(1, 1)] * 4 + [(5, 7), (3, 4)]), r"at most 4 levels"),
        (dict(sampling_locations=torch.rand(B, Q, H, L, P)), r"sampling_locations must have shape \[2, Q, 3, 2, P, 2\]"),
        (dict(sampling_locations=torch.rand(B, Q, H + 1, L, P, 2)), r"sampling_locations must have shape"),
        (dict(sampling_locations=torch.rand(B, Q, H, L, P, 2).half()), r"sampling_locations must have dtype"),
        (dict(attention_weights=torch.rand(B, Q, H, L, P + 1)), r"attention_weights must have shape \[2, 7, 3, 2, 4\]"),
        (dict(attention_weights=torch.rand(B, Q, H, L, P, device="meta")), r"attention_weights is on meta"),
    ],
)
def test_msda_input_checks(change, match):
    kwargs = _bad_classic() | change
    with pytest.raises(ValueError, match=match):
        msda(**kwargs)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(reference_points=torch.rand(B, Q, 3, 2)), r"R \(dim 2\) must divide num_points P=4"),
        (dict(reference_points=torch.rand(B, Q + 1, R, 2)), r"reference_points must have shape \[2, 7, R, 2\]"),
        (dict(sampling_offsets=torch.rand(B, Q, H, L + 1, P, 2)), r"sampling_offsets must have shape \[2, Q, 3, 2, P, 2\]"),
        (dict(attention_logits=torch.rand(B, Q, H, L, P)), r"attention_logits must have shape \[2, 7, 3, 8\]"),
        (dict(attention_logits=torch.rand(B, Q, H, L * P + 1)), r"attention_logits must have shape"),
        (dict(value=torch.randn(B, S, H, 4).half(), variant="int8"), r"variant 'int8' takes value as torch.int8"),
        (dict(value=torch.zeros(B, S, H, 4, dtype=torch.int8)), r"variant 'int8' needs value_scale"),
        (dict(value=torch.zeros(B, S, H, 4, dtype=torch.int8), value_scale=-1.0), r"value_scale must be a positive"),
    ],
)
def test_msda_fused_input_checks(change, match):
    kwargs = _bad_fused() | change
    with pytest.raises(ValueError, match=match):
        msda_fused(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA spatial_shapes tensor needs a GPU")
def test_cuda_spatial_shapes_rejected():
    kwargs = _bad_classic() | dict(spatial_shapes=torch.tensor(SHAPES, device="cuda"))
    with pytest.raises(ValueError, match=r"synchronise"):
        msda(**kwargs)


def test_opcheck(monkeypatch):
    # on the CPU reference path (the interpreter would make the aot_dispatch checks minutes long)
    monkeypatch.setattr(msda_module, "use_triton", lambda t: t.device.type == "cuda")
    shapes, value, loc, weights, ref, offsets, logits = _tiny_inputs()
    flat = [v for hw in shapes for v in hw]
    args = (value.requires_grad_(True), flat, loc.requires_grad_(True), weights.requires_grad_(True), "fp32", 1.0)
    torch.library.opcheck(torch.ops.bevdeploy.msda.default, args)
    args = (value, flat, ref.requires_grad_(True), offsets.requires_grad_(True), logits.requires_grad_(True), "fp32", 1.0)
    torch.library.opcheck(torch.ops.bevdeploy.msda_fused.default, args)


class _Classic(torch.nn.Module):
    def forward(self, value, loc, weights):
        return msda(value, [(3, 4), (2, 3)], loc, weights)


class _Fused(torch.nn.Module):
    def forward(self, value, ref, offsets, logits):
        return msda_fused(value, [(3, 4), (2, 3)], ref, offsets, logits)


@pytest.mark.parametrize("which", ["msda", "msda_fused"])
def test_export_round_trip(which):
    shapes, value, loc, weights, ref, offsets, logits = _tiny_inputs()
    module, args = (_Classic(), (value, loc, weights)) if which == "msda" else (_Fused(), (value, ref, offsets, logits))
    exported = torch.export.export(module, args)
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    target = getattr(torch.ops.bevdeploy, which).default
    nodes = [n for n in loaded.graph.nodes if n.op == "call_function" and n.target == target]
    assert len(nodes) == 1
    assert torch.equal(loaded.module()(*args), module(*args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="BEVFormer-size check runs on the GPU")
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
def test_bevformer_base_sca_shape_on_gpu(variant):
    # real level sizes, P=8, R=4: int32 offsets, 4 unrolled levels, block heuristics at scale
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(116, 200), (58, 100), (29, 50), (15, 25)]
    b, q, h, d, p, r = 6, 2000, 8, 32, 8, 4
    value = torch.randn(b, sum(x * y for x, y in shapes), h, d, device="cuda", generator=g)
    ref = torch.rand(b, q, r, 2, device="cuda", generator=g)
    offsets = torch.randn(b, q, h, len(shapes), p, 2, device="cuda", generator=g) * 4
    logits = torch.randn(b, q, h, len(shapes) * p, device="cuda", generator=g)
    stored, scale, value64 = _store(value, variant)
    expected = reference_fused(value64, shapes, ref.double(), offsets.double(), logits.double())
    out = msda_fused(stored, shapes, ref, offsets, logits, variant=variant, value_scale=scale)
    loc, weights = fused_to_classic(shapes, ref, offsets, logits)
    out_classic = msda(stored, shapes, loc, weights, variant=variant, value_scale=scale)
    for o in (out, out_classic):
        if variant == "int8":
            assert_int8_close(o, expected, _int8_bound(scale))
        else:
            assert_rel_close(o, expected, REL_TOL[variant])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decoder/TSA-size check runs on the GPU")
@pytest.mark.parametrize("variant", ["fp16", "fp16x2"])
def test_decoder_shape_on_gpu(variant):
    # one 200x200 level, P=4, R=1, 900 queries: the small-grid branch of the launch heuristic
    g = torch.Generator(device="cuda").manual_seed(0)
    b, q, h, d, p = 1, 900, 8, 32, 4
    value = torch.randn(b, 200 * 200, h, d, device="cuda", generator=g).half()
    ref = torch.rand(b, q, 1, 2, device="cuda", generator=g).half()
    offsets = (torch.randn(b, q, h, 1, p, 2, device="cuda", generator=g) * 4).half()
    logits = torch.randn(b, q, h, p, device="cuda", generator=g).half()
    expected = reference_fused(value.double(), [(200, 200)], ref.double(), offsets.double(), logits.double())
    assert_rel_close(msda_fused(value, [(200, 200)], ref, offsets, logits, variant=variant), expected, REL_TOL[variant])
